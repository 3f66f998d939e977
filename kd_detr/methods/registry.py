"""The method registry: one decorator, keyed by the recipe section a method reads (timm's ``register_model``
style). It drives the recipe loader (which sections exist and their config classes), ``kd-detr recipes``
and the tests."""

from __future__ import annotations

from typing import Any, Callable, Optional

from torch import nn

from .base import Method

__all__ = ["register_method", "get_method", "list_methods", "build_methods", "check_capabilities"]

_METHODS: dict[str, type[Method]] = {}


def register_method(section: str, config_class: type) -> Callable[[type[Method]], type[Method]]:
    """Class decorator: register a :class:`Method` under its recipe ``section`` with its config dataclass.

    Methods run (and their terms are summed) in registration order."""

    def wrap(cls: type[Method]) -> type[Method]:
        if not (isinstance(cls, type) and issubclass(cls, Method)):
            raise TypeError(f"@register_method({section!r}) decorates a Method subclass, not {cls!r}")
        if section in _METHODS and _METHODS[section] is not cls:
            raise ValueError(f"recipe section {section!r} is already registered to {_METHODS[section].__name__}")
        cls.section, cls.config_class = section, config_class
        _METHODS[section] = cls
        return cls

    return wrap


def get_method(section: str) -> type[Method]:
    if section not in _METHODS:
        raise KeyError(f"no method is registered for recipe section {section!r}; registered: {', '.join(_METHODS)}")
    return _METHODS[section]


def list_methods() -> dict[str, type[Method]]:
    """Section name -> method class, in registration order."""
    return dict(_METHODS)


def check_capabilities(section: str, required: frozenset[str], student: Any) -> None:
    """Refuse, before anything is built, a recipe section whose method needs a student capability
    (:data:`~kd_detr.models.detector.CAPABILITIES`) that ``student`` (its config) lacks, naming the section, the
    student's family and the capabilities."""
    lacking = sorted(required - frozenset(getattr(student, "supports", required)))
    if lacking:
        family = getattr(student, "family", None)
        who = f"{student.name} (transformers {family})" if family else str(getattr(student, "name", student))
        raise ValueError(f"recipe section [{section}] needs the student's {', '.join(lacking)}, which the student "
                         f"{who} does not have (it runs its own decoder): switch [{section}] off "
                         f"({section}.enabled = false) or use kd-detr's Conditional DETR student")


def build_methods(sections: dict[str, Any], student: Any, criterion: nn.Module,
                  teacher: Optional[Callable[[], Any]] = None) -> list[Method]:
    """The methods a recipe switches on (``sections``: section name -> config), in registration order.

    ``teacher``: a callable that prepares the teacher and returns its config; it is called once, only when
    an enabled method needs a teacher, and after the methods without one are built, so that their
    initialisation does not depend on whether or how a teacher is loaded (``d3etr_ms`` starts its MS-DETR
    modules exactly as ``ms_detr`` does). A method that needs a teacher is refused without one.
    """
    enabled = {name: cls for name, cls in _METHODS.items()
               if sections.get(name) is not None and cls.enabled(sections[name])}
    for name, cls in enabled.items():
        check_capabilities(name, cls.requires(sections[name]), student)
    built = {name: cls.build(sections[name], student, criterion)
             for name, cls in enabled.items() if not cls.uses_teacher}
    needs = [name for name, cls in enabled.items() if cls.uses_teacher]
    if needs:
        if teacher is None:
            raise ValueError(f"recipe section [{needs[0]}] distils from a teacher: give --teacher or --teacher-cache")
        teacher_config = teacher()
        for name in needs:
            built[name] = enabled[name].build(sections[name], student, criterion, teacher_config)
    return [built[name] for name in enabled]
