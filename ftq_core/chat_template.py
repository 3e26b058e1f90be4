"""Chat templates rendered as transformers renders them, under a time and size budget.

A chat template is a Jinja program that comes with the model.  transformers
runs it in Jinja's sandbox, which stops it from reaching Python internals but
not from running for hours (nested ``range`` loops), filling memory (a string
doubled forty times, ``'a' * 10**12``) or recursing until Python gives up.
Here the same template, in an environment set up as transformers sets up
its own (same options, globals and filters, so a normal template renders
the same text), runs with:

* every operator, call, attribute look-up, loop step and filter counted
  against a deadline (:data:`RENDER_SECONDS`);
* every string it builds (``*``, ``+``, ``~``, ``%``, filters, calls) and
  its output capped (:func:`_char_limit`), checked before the big string is
  made where the sizes are known in advance;
* the render itself in a worker thread that is given up on at the deadline,
  for loops that call nothing the sandbox sees;
* recursion and memory errors caught.

Each failure is one :class:`ChatTemplateError` line saying what the template
did and to fix or remove ``chat_template``.
"""

from __future__ import annotations

import contextvars
import functools
import re
import threading
import time
from typing import Any

from .errors import ArtifactError

__all__ = ["ChatTemplateError", "RENDER_SECONDS", "render_chat", "tokenize_chat"]

#: Longest a template may take to render one conversation (a normal one takes well under a millisecond).
RENDER_SECONDS = 5.0
#: Fewest characters any string or output may have before the budget refuses it.
MIN_CHAR_LIMIT = 1 << 20
#: Longest ``range`` a template may ask for (Jinja's own sandbox limit).
MAX_RANGE = 100_000
#: Largest integer power a template may compute, in bits.
_MAX_POWER_BITS = 1 << 16
#: A width of a million or more in a format string (``%9999999s``, ``{:>9999999}``).
_HUGE_WIDTH = re.compile(r"%[-+ #0*]*\d{7,}|\{[^{}]*:[^{}]*\d{7,}[^{}]*\}")

_BUDGET: contextvars.ContextVar["_Budget | None"] = contextvars.ContextVar("ftq_chat_template_budget", default=None)


class ChatTemplateError(ArtifactError):
    """A chat template that cannot render, or that refused one conversation (``rejected``: e.g. ``raise_exception``)."""

    def __init__(self, message: str, *, rejected: bool = False):
        super().__init__(message)
        self.rejected = rejected


class _OverBudget(Exception):
    """The template went past its deadline or size cap; the message says which."""


class _Budget:
    """The deadline and the longest string of one render."""

    def __init__(self, seconds: float, chars: int):
        self.deadline, self.chars = time.monotonic() + seconds, chars

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise _OverBudget(f"it ran for more than {RENDER_SECONDS:g} s")

    def size(self, length: int) -> None:
        if length > self.chars:
            raise _OverBudget(f"it builds a string of {length} characters (at most {self.chars} here)")


def _budget() -> _Budget:
    budget = _BUDGET.get()
    if budget is None:  # a template compiled here but rendered outside render_chat: no budget to count against
        raise _OverBudget("it was rendered outside ftq's budgeted renderer")
    return budget


def _checked(value: Any) -> Any:
    """``value``, after a tick of the deadline and, for strings and lists, the size cap."""
    budget = _budget()
    budget.tick()
    if isinstance(value, (str, list, tuple)):
        budget.size(len(value))
    return value


def _check_arguments(args, kwargs) -> None:
    """Refuse integer arguments that would make a huge string (``'x'.ljust(10**12)``) before it is made."""
    budget = _budget()
    for arg in (*args, *kwargs.values()):
        if isinstance(arg, int) and not isinstance(arg, bool) and abs(arg) > budget.chars:
            raise _OverBudget(f"it asks for a size of {arg}")


def _check_format(text: Any) -> None:
    """Refuse a format string with a width of a million or more (``%9999999s``, ``{:>9999999}``)."""
    if isinstance(text, str) and _HUGE_WIDTH.search(text):
        raise _OverBudget("it formats with a width of a million characters or more")


def _binop_size(operator: str, left: Any, right: Any) -> None:
    """Refuse ``*``, ``+``, ``**`` and ``%`` whose result would be past the budget, before computing it."""
    budget = _budget()
    sized = (str, list, tuple)
    if operator == "*":
        for seq, times in ((left, right), (right, left)):
            if isinstance(seq, sized) and isinstance(times, int):
                budget.size(len(seq) * max(times, 0))
    elif operator == "+" and isinstance(left, sized) and isinstance(right, sized):
        budget.size(len(left) + len(right))
    elif operator == "**" and isinstance(left, int) and isinstance(right, int) and right > 0:
        if max(abs(left), 2).bit_length() * right > _MAX_POWER_BITS:
            raise _OverBudget(f"it computes {left} ** {right}")
    elif operator == "%" and isinstance(left, str):
        _check_format(left)
        _check_arguments(right if isinstance(right, tuple) else (right,), {})


def _bounded_range(*args):
    """Jinja's sandboxed ``range``, each step counted against the deadline."""
    _check_arguments(args, {})
    steps = range(*args)
    if len(steps) > MAX_RANGE:
        raise _OverBudget(f"it asks for a range of {len(steps)} numbers (at most {MAX_RANGE})")
    budget = _budget()
    for number in steps:
        budget.tick()
        yield number


def _bounded_filter(name: str, function):
    """A filter whose arguments (after the value it filters) and result are checked against the budget."""
    @functools.wraps(function)
    def bounded(*args, **kwargs):
        if name == "format" and args:
            _check_format(args[0])
        _check_arguments(args[1:], kwargs)
        return _checked(function(*args, **kwargs))

    return bounded


@functools.cache
def _environment_class():
    """An :class:`ImmutableSandboxedEnvironment` whose operators, calls, look-ups and joins count against the budget."""
    from jinja2.compiler import CodeGenerator
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class BoundedCodeGenerator(CodeGenerator):
        def visit_Concat(self, node, frame):  # ``a ~ b``: Jinja joins these itself, outside the sandbox's hooks
            self.write("environment.bounded_join((")
            for arg in node.nodes:
                self.visit(arg, frame)
                self.write(", ")
            self.write("))")

    class BoundedEnvironment(ImmutableSandboxedEnvironment):
        code_generator_class = BoundedCodeGenerator
        intercepted_binops = frozenset(["*", "**", "+", "%"])

        def call_binop(self, context, operator, left, right):
            _budget().tick()
            _binop_size(operator, left, right)
            return _checked(super().call_binop(context, operator, left, right))

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - Jinja's own signature
            _budget().tick()
            if getattr(__obj, "__name__", "") in ("format", "format_map"):  # the sandbox wraps str.format
                _check_format(getattr(getattr(__obj, "__wrapped__", __obj), "__self__", None))
            _check_arguments(args, kwargs)
            return _checked(super().call(__context, __obj, *args, **kwargs))

        def getattr(self, obj, attribute):
            _budget().tick()
            return super().getattr(obj, attribute)

        def getitem(self, obj, argument):
            _budget().tick()
            return super().getitem(obj, argument)

        def bounded_join(self, parts):
            texts = [str(part) for part in parts]
            _budget().size(sum(map(len, texts)))
            return _checked("".join(texts))

    return BoundedEnvironment


@functools.lru_cache(maxsize=16)
def _compile(template: str):
    """``template`` compiled in the bounded environment, with transformers' options, globals and filters."""
    from transformers.utils.chat_template_utils import _compile_jinja_template

    reference = _compile_jinja_template("").environment  # how transformers sets up every chat template
    environment = _environment_class()(
        trim_blocks=True, lstrip_blocks=True, extensions=[type(ext) for ext in reference.extensions.values()],
    )
    for name in ("raise_exception", "strftime_now", "dict", "namespace"):
        if name in reference.globals:
            environment.globals[name] = reference.globals[name]
    environment.globals["range"] = _bounded_range
    environment.filters["tojson"] = reference.filters["tojson"]
    environment.filters = {name: _bounded_filter(name, function) for name, function in environment.filters.items()}
    return environment.from_string(template)


def _char_limit(messages: list[dict]) -> int:
    """The longest string or output a render may make: room for the conversation many times over."""
    return MIN_CHAR_LIMIT + 16 * sum(len(str(m.get("content", ""))) for m in messages)


def _render(template: str, variables: dict, budget: _Budget) -> str:
    """The template's output, chunk by chunk within the budget (runs in the worker thread)."""
    _BUDGET.set(budget)
    compiled = _compile(template)
    out, length = [], 0
    for chunk in compiled.generate(**variables):
        budget.tick()
        length += len(chunk)
        budget.size(length)
        out.append(chunk)
    return "".join(out)


def _in_worker(function, *args):
    """``function(*args)`` in a thread given up on a second after the deadline (its next hook then stops it)."""
    result: dict[str, Any] = {}

    def run():
        try:
            result["value"] = function(*args)
        except BaseException as exc:  # handed to the caller, which decides
            result["error"] = exc

    worker = threading.Thread(target=run, name="ftq-chat-template", daemon=True)
    worker.start()
    worker.join(RENDER_SECONDS + 1)
    if worker.is_alive():
        raise _OverBudget(f"it ran for more than {RENDER_SECONDS:g} s")
    if "error" in result:
        raise result["error"]
    return result["value"]


def _error(where: str, exc: BaseException) -> ChatTemplateError:
    """One line for what went wrong while rendering the template of ``where``."""
    from jinja2.exceptions import SecurityError, TemplateError, TemplateSyntaxError

    fix = "fix or remove chat_template in tokenizer_config.json"
    if isinstance(exc, SecurityError):
        return ChatTemplateError(
            f"the chat template of {where} tried to reach Python internals ({exc}) and the template sandbox stopped "
            f"it: do not trust this model. Run without --chat, or restore chat_template in tokenizer_config.json "
            f"from the source model.")
    if isinstance(exc, _OverBudget):
        return ChatTemplateError(f"the chat template of {where} was stopped: {exc}; {fix}")
    if isinstance(exc, (RecursionError, MemoryError, OverflowError)):
        what = {RecursionError: "recurses without end", MemoryError: "needs more memory than there is",
                OverflowError: "computes numbers too large to hold"}[type(exc)]
        return ChatTemplateError(f"the chat template of {where} {what}; {fix}")
    if isinstance(exc, TemplateSyntaxError):
        return ChatTemplateError(f"the chat template of {where} is not valid Jinja (line {exc.lineno}: {exc.message}); "
                                 f"{fix}")
    detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return ChatTemplateError(f"the chat template of {where} refused the conversation ({type(exc).__name__}: "
                             f"{detail[:200]}); {fix}", rejected=isinstance(exc, TemplateError))


def render_chat(tokenizer, messages: list[dict], *, add_generation_prompt: bool, where: str) -> str:
    """``messages`` rendered with ``tokenizer``'s chat template: the text ``apply_chat_template(tokenize=False)``
    gives, or :class:`ChatTemplateError` (``where`` names the model in its message)."""
    from jinja2.exceptions import TemplateError

    variables = {**tokenizer.special_tokens_map, "messages": [dict(m) for m in messages], "tools": None,
                 "documents": None, "add_generation_prompt": add_generation_prompt}
    budget = _Budget(RENDER_SECONDS, _char_limit(messages))
    try:
        text = _in_worker(_render, tokenizer.chat_template, variables, budget)
    except (TemplateError, _OverBudget, RecursionError, MemoryError, OverflowError) as exc:
        raise _error(where, exc) from None
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, ZeroDivisionError) as exc:
        raise _error(where, exc) from None  # a template that fails on this conversation's shape
    if not text.strip():
        raise ChatTemplateError(f"the chat template of {where} renders nothing for a conversation; fix or remove "
                                f"chat_template in tokenizer_config.json", rejected=True)
    return text


def tokenize_chat(tokenizer, messages: list[dict], *, add_generation_prompt: bool, where: str) -> list[int]:
    """The token ids ``apply_chat_template(tokenize=True)`` gives: the rendered text without added special tokens."""
    text = render_chat(tokenizer, messages, add_generation_prompt=add_generation_prompt, where=where)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
