"""kd-detr's test suite: a package, so that test files in different rooms (tests/teacher/, tests/models/, ...)
may share a base name, and the shared helpers import as ``tests.support``."""
