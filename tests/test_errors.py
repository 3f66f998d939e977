"""kd-detr's user-facing errors: one base class, one line on the command line."""

from __future__ import annotations

from click.testing import CliRunner


def test_user_errors_are_one_line_on_the_command_line(monkeypatch):
    """Every kd-detr error a user can fix derives from UserError and reaches the terminal as one line;
    a bug (any other exception) keeps its traceback."""
    import click

    from kd_detr import cli
    from kd_detr.errors import UserError
    from kd_detr.folder_lock import FolderLockError
    from kd_detr.teacher.ray_actor import TeacherActorError

    from kd_detr.teacher.cache import CacheError

    assert issubclass(TeacherActorError, RuntimeError) and issubclass(FolderLockError, OSError)
    assert all(issubclass(e, UserError) for e in (TeacherActorError, FolderLockError, CacheError))

    @cli.main.command("boom-user", hidden=True)
    @click.argument("kind")
    def boom(kind):
        raise {"actor": TeacherActorError("teacher actor died 4 times"), "plain": UserError("bad thing: fix it"),
               "bug": RuntimeError("a bug")}[kind]

    try:
        for kind, line in (("actor", "Error: teacher actor died 4 times"), ("plain", "Error: bad thing: fix it")):
            res = CliRunner().invoke(cli.main, ["boom-user", kind])
            assert res.exit_code == 1 and res.output.strip() == line
        res = CliRunner().invoke(cli.main, ["boom-user", "bug"])
        assert isinstance(res.exception, RuntimeError) and str(res.exception) == "a bug"
    finally:
        cli.main.commands.pop("boom-user", None)
