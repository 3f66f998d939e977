"""What several test files share: a tiny detector and batch (``tiny``), tiny distillation runs through the CLI
(``runs``), a small hand-built teacher cache (``cache_store``), the Ray processes a command leaves behind
(``ray_processes``), the golden runs (``golden_runs``, also a script) and the DDP worker script
(``ddp_grad_worker``, run by torchrun). Nothing here is collected as a test."""

from pathlib import Path

SUPPORT_DIR = Path(__file__).resolve().parent
TESTS_DIR = SUPPORT_DIR.parent
FIXTURES_DIR = TESTS_DIR / "fixtures"
REPO_ROOT = TESTS_DIR.parent
