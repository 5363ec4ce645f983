"""Running one op through the cpu backend's registry, as the executor binds it: the way tests pick
an implementation (never by patching module globals)."""
from v4c.backends import get_backend

CPU = get_backend("cpu")


def run(op, *args, impl=None, phase=None, ctx=None, **attrs):
    """``op`` on ``args`` by implementation ``impl`` (None: the one the cpu backend chooses)."""
    return CPU.callable(op, args, attrs, name=impl, phase=phase, ctx=ctx)(*args, **attrs)


def chosen(op, *args, phase=None, **attrs) -> str:
    """The name of the implementation the cpu backend binds for such a call."""
    from v4c.backends import call_on, choose
    return choose(CPU, call_on(op, args, attrs, phase)).impl.name
