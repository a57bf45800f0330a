"""Chat prompts for a model whose tokenizer ships no chat template: Phi-2's formats, from its model card.

Phi-2 was not instruction-tuned; its card documents two prompt formats it answers well:

- QA: `Instruct: <question>\\nOutput:` (used for a single user message, the common case);
- chat: `Alice: <user>\\nBob: <assistant>\\n...\\nBob:` turns (used for anything longer).

System (and developer) messages become plain paragraphs before the turns: Phi-2 has no system role. A
message's `name` is its speaker's label in the chat format (that is how the format names speakers). The next
user turn's marker (`\\nAlice:`, or `\\nInstruct:` for QA) is added as a stop string, so the model does not
go on to write the user's side. This is the one place that knows the format.
"""

from __future__ import annotations

from dataclasses import dataclass

USER = "Alice"
ASSISTANT = "Bob"


@dataclass(frozen=True)
class ChatPrompt:
    """A conversation rendered as one prompt, and the stop strings its format needs."""

    text: str
    stop: tuple[str, ...] = ()
    strip_reply: bool = False
    """The format ends with `Output:`/`Bob:`, so the reply starts with the separating space: strip it."""


def phi2_prompt(messages: list[dict[str, str]]) -> ChatPrompt:
    """Render `messages` ({"role": system|user|assistant, "content", optional "name"}) in Phi-2's format."""
    turns = [m for m in messages if m["role"] != "system"]
    if len(turns) == 1 and turns[0]["role"] == "user" and not turns[0].get("name"):
        preamble = "".join(m["content"] + "\n\n" for m in messages if m["role"] == "system")
        return ChatPrompt(f"{preamble}Instruct: {turns[0]['content']}\nOutput:", ("\nInstruct:",), True)

    lines: list[str] = []
    user_labels: list[str] = []
    assistant = ASSISTANT
    for message in messages:
        role, content = message["role"], message["content"]
        if role == "system":
            lines.append(content + "\n")
            continue
        label = message.get("name") or (USER if role == "user" else ASSISTANT)
        if role == "user" and label not in user_labels:
            user_labels.append(label)
        if role == "assistant":
            assistant = label  # the reply continues as the same speaker
        lines.append(f"{label}: {content}")
    lines.append(f"{assistant}:")
    return ChatPrompt("\n".join(lines), tuple(f"\n{label}:" for label in user_labels or [USER]), True)
