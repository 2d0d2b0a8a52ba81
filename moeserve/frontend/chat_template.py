"""Chat messages -> prompt text: the checkpoint's ``chat_template`` (tokenizer_config.json) rendered in a
sandboxed Jinja environment, as Hugging Face does; ``DEFAULT_CHAT_TEMPLATE`` when the checkpoint has none."""

from __future__ import annotations

from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from moeserve.frontend.errors import BadRequest
from moeserve.model.tokenizer import Tokenizer

# Used when tokenizer_config.json has no chat_template: one "<|role|>" header line per message, then the
# assistant header when a reply is wanted.
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def _raise(message: str) -> None:
    raise TemplateError(message)


class ChatTemplate:
    def __init__(self, tokenizer: Tokenizer | None):
        source = (tokenizer.chat_template if tokenizer is not None else None) or DEFAULT_CHAT_TEMPLATE
        self.is_default = source == DEFAULT_CHAT_TEMPLATE
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        self.template = env.from_string(source)
        # what render() sets and the template's globals (range, namespace...): a request's
        # chat_template_kwargs may add variables, not replace these
        self.reserved = frozenset({"messages", "add_generation_prompt", "tools", "bos_token", "eos_token",
                                   *env.globals})
        self.special = {"bos_token": "", "eos_token": ""}
        if tokenizer is not None:
            if tokenizer.bos_token_id is not None:
                self.special["bos_token"] = tokenizer.decode([tokenizer.bos_token_id], skip_special_tokens=False)
            if tokenizer.eos_token_ids:
                self.special["eos_token"] = tokenizer.decode([tokenizer.eos_token_ids[0]],
                                                             skip_special_tokens=False)

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
               tools: list[dict[str, Any]] | None = None, extra: dict[str, Any] | None = None) -> str:
        """The prompt text (BOS included when the template writes it: encode it without adding another).
        ``tools`` (OpenAI tool definitions) are passed to the template as Hugging Face does (None: no tools);
        ``extra`` (a request's ``chat_template_kwargs``, as vLLM takes them: ``{"thinking": true}``) are more
        template variables, which may not replace the ones set here."""
        extra = extra or {}
        taken = next((k for k in extra if k in self.reserved), None)
        if taken is not None:
            raise BadRequest(f"chat_template_kwargs may not set {taken!r}, which the server sets",
                             f"chat_template_kwargs.{taken}")
        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        tools=tools, **self.special, **extra)
        except TemplateError as e:
            raise BadRequest(f"the chat template rejected the messages: {e}", "messages") from None
        except Exception as e:  # noqa: BLE001 - template code on a client's values (adding a number to text)
            where = "chat_template_kwargs" if extra else "messages"
            raise BadRequest(f"the chat template failed on this request's {where}: {type(e).__name__}: {e}",
                             where) from None
