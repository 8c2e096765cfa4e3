"""The tokenizer interface the data pipeline needs, a tiny deterministic byte-level tokenizer for tests, and
jinja2 chat templates rendered the way Hugging Face renders them.

A tokenizer is any object with

- ``encode(text) -> list[int]`` (if it accepts ``add_special_tokens``, it is called with ``False``: the pipeline
  adds BOS/EOS itself),
- optionally ``eos_token_id``, ``bos_token_id``, ``pad_token_id`` (ints or None), ``eos_token``/``bos_token``
  (strings), and
- optionally ``apply_chat_template(messages, tokenize=False, add_generation_prompt=False) -> str`` (and
  ``tools=`` for conversations with tool calls) — a Hugging Face tokenizer has it; so does :class:`ByteTokenizer`
  when given a template, through :func:`render_chat_template` (which any tokenizer carrying a jinja2 template
  string, e.g. one read from a GGUF file's ``tokenizer.chat_template``, can use).
"""

from __future__ import annotations

import contextvars
import inspect
import time
from functools import lru_cache

#: the ChatML template (SmolLM2-Instruct's, without its default system prompt): used by the tests and examples
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


#: bounds on one rendering of a chat template. A template formats one conversation (a real one loops over the
#: messages); one that loops without end or builds huge strings — broken or hostile, it comes with the model —
#: is stopped with a ChatTemplateError instead of hanging ``generate`` or the data pipeline
TEMPLATE_MAX_ITERATIONS = 1_000_000  # for-loop iterations, all loops of the rendering together
TEMPLATE_MAX_SECONDS = 10.0
TEMPLATE_MAX_CHARS = 10_000_000  # the rendered text, and any string or list a template makes with * or **


class ChatTemplateError(ValueError):
    """A chat template that cannot be rendered, or cannot be split into prompt and response for an example."""


class _Budget:
    """What one rendering may still spend: loop iterations and time."""

    def __init__(self):
        self.iterations = TEMPLATE_MAX_ITERATIONS
        self.deadline = time.monotonic() + TEMPLATE_MAX_SECONDS

    def tick(self) -> None:
        self.iterations -= 1
        if self.iterations < 0:
            raise ChatTemplateError(f"the chat template ran more than {TEMPLATE_MAX_ITERATIONS:,} loop iterations "
                                    "for one conversation: it does not terminate in reasonable time")
        if time.monotonic() > self.deadline:
            raise ChatTemplateError(f"the chat template ran for more than {TEMPLATE_MAX_SECONDS:g} s on one "
                                    "conversation: it does not terminate in reasonable time")


_BUDGET: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("qlora_template_budget", default=None)


class _Counted:
    """A for-loop's iterable whose every step is counted against the rendering's budget (``len`` passes through,
    so ``loop.length`` and ``loop.last`` work as before)."""

    def __init__(self, iterable):
        self.iterable = iterable

    def __len__(self) -> int:
        return len(self.iterable)

    def __iter__(self):
        budget = _BUDGET.get()
        for item in self.iterable:
            if budget is not None:
                budget.tick()
            yield item


def _too_big(operator: str, left, right) -> bool:
    """Whether ``left <operator> right`` would build a string/list or a number beyond the bounds."""
    if operator == "*":
        for seq, n in ((left, right), (right, left)):
            if isinstance(seq, str | list | tuple) and isinstance(n, int) and len(seq) * n > TEMPLATE_MAX_CHARS:
                return True
    if operator == "**" and isinstance(left, int | float) and isinstance(right, int | float):
        return abs(left) > 1 and right > 4096
    return False


@lru_cache(maxsize=32)
def _compile(template: str):
    try:
        from jinja2 import nodes
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as e:  # pragma: no cover - jinja2 comes with the hf and demo extras
        raise ImportError("rendering a chat template needs jinja2: pip install jinja2") from e

    class BoundedSandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**"})

        def call_binop(self, context, operator, left, right):
            if _too_big(operator, left, right):
                raise ChatTemplateError(f"the chat template computes a value too large ({operator!r} beyond "
                                        f"{TEMPLATE_MAX_CHARS:,} elements)")
            return super().call_binop(context, operator, left, right)

    def raise_exception(message):
        from jinja2.exceptions import TemplateError

        raise TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        import json

        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    # the same environment options transformers uses for chat templates
    env = BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["_qlora_counted"] = _Counted
    try:
        tree = env.parse(template)
        for loop in tree.find_all(nodes.For):  # every loop counts its steps (public AST, jinja2.nodes)
            loop.iter = nodes.Call(nodes.Name("_qlora_counted", "load", lineno=loop.lineno), [loop.iter], [], None,
                                   None, lineno=loop.lineno)
        return env.from_string(tree)
    except Exception as e:  # a syntax error, or anything the compiler rejects
        raise ChatTemplateError(f"the chat template does not compile: {e}") from None


def render_chat_template(template: str, messages: list[dict], add_generation_prompt: bool = False,
                         tools: list | None = None, **special_tokens) -> str:
    """Render a jinja2 chat template (Hugging Face's conventions: ``messages``, ``add_generation_prompt``, ``tools``
    (None without), ``raise_exception``, ``tojson``, and special tokens such as ``bos_token``/``eos_token`` as
    variables).

    Sandboxed (jinja2's immutable sandbox, as transformers renders templates) and bounded: at most
    ``TEMPLATE_MAX_ITERATIONS`` loop steps, ``TEMPLATE_MAX_SECONDS`` and ``TEMPLATE_MAX_CHARS`` characters. Any
    failure — a ``raise_exception`` of the template, an error inside it, a bound reached — is a
    :class:`ChatTemplateError`."""
    compiled = _compile(template)
    token = _BUDGET.set(_Budget())
    try:
        parts, size = [], 0
        for chunk in compiled.generate(messages=messages, add_generation_prompt=add_generation_prompt, tools=tools,
                                       **special_tokens):
            size += len(chunk)
            if size > TEMPLATE_MAX_CHARS:
                raise ChatTemplateError(f"the chat template renders more than {TEMPLATE_MAX_CHARS:,} characters "
                                        "for one conversation")
            parts.append(chunk)
        return "".join(parts)
    except ChatTemplateError:
        raise
    except (Exception, RecursionError) as e:  # the template's own raise_exception, or any error inside it
        raise ChatTemplateError(f"the chat template failed: {type(e).__name__}: {e}") from None
    finally:
        _BUDGET.reset(token)


class ByteTokenizer:
    """Deterministic byte-level tokenizer: token ``i < 256`` is byte ``i`` of the UTF-8 text; then ``<pad>`` (256),
    ``<s>`` (257) and ``</s>`` (258). ``vocab_size`` is 259. With ``chat_template`` it also formats chats."""

    pad_token, bos_token, eos_token = "<pad>", "<s>", "</s>"
    pad_token_id, bos_token_id, eos_token_id = 256, 257, 258
    vocab_size = 259

    def __init__(self, chat_template: str | None = None):
        self.chat_template = chat_template
        if chat_template is None:
            # no template: the pipeline falls back to the Alpaca format (formats.has_chat_template checks this)
            self.apply_chat_template = None

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [self.bos_token_id, *ids] if add_special_tokens else ids

    def decode(self, ids) -> str:
        special = {self.pad_token_id: "", self.bos_token_id: self.bos_token, self.eos_token_id: self.eos_token}
        out, buf = [], bytearray()
        for i in ids:
            i = int(i)
            if i < 256:
                buf.append(i)
                continue
            out.append(buf.decode("utf-8", errors="replace"))
            buf = bytearray()
            out.append(special.get(i, ""))
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    def apply_chat_template(self, messages, tokenize: bool = False, add_generation_prompt: bool = False,
                            tools: list | None = None):
        text = render_chat_template(self.chat_template, messages, add_generation_prompt, tools,
                                    bos_token=self.bos_token, eos_token=self.eos_token)
        return self.encode(text) if tokenize else text


def encode(tokenizer, text: str) -> list[int]:
    """``tokenizer.encode(text)`` without special tokens, for any tokenizer of the interface above."""
    if _accepts_add_special_tokens(type(tokenizer)):
        ids = tokenizer.encode(text, add_special_tokens=False)
    else:
        ids = tokenizer.encode(text)
    return [int(i) for i in ids]


@lru_cache(maxsize=64)
def _accepts_add_special_tokens(cls) -> bool:
    try:
        sig = inspect.signature(cls.encode)
    except (TypeError, ValueError):
        return False
    return "add_special_tokens" in sig.parameters or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())


def has_chat_template(tokenizer) -> bool:
    """Whether the tokenizer can format chats (a Hugging Face tokenizer without a template counts as not)."""
    if not callable(getattr(tokenizer, "apply_chat_template", None)):
        return False
    template = getattr(tokenizer, "chat_template", "present")
    return bool(template)
