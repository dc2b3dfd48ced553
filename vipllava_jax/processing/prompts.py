"""Chat prompts in the formats VipLlava was trained and evaluated with.

- "vipllava": the model card's format (llava-hf/vip-llava-*-hf):
  `{system}###Human: <image>\\n{p1}###Assistant: {a1}###Human: {p2}###Assistant:`
- "llava_v1": the original ViP-LLaVA repository's training/evaluation format:
  `{system} USER: <image>\\n{p1} ASSISTANT: {a1}</s>USER: {p2} ASSISTANT:`

Both follow LLaVA's `Conversation.get_prompt`: `system + sep1`, then for each message
`role + ": " + message + sep` (seps alternate user / assistant), and a bare `role + ":"` for the
message the model is to write.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Union

from vipllava_jax.errors import VipLlavaError


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """A LLaVA conversation style: system text, role names and the separator after each role."""

    system: str
    roles: tuple[str, str]  # (user, assistant)
    seps: tuple[str, str]  # appended after a user message / an assistant message


TEMPLATES: dict[str, ChatTemplate] = {
    "vipllava": ChatTemplate(
        system="A chat between a curious human and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the human's questions.",
        roles=("Human", "Assistant"),
        seps=("###", "###"),
    ),
    "llava_v1": ChatTemplate(  # the original's conv_llava_v1 (vicuna_v1 says "user"/"user's")
        system="A chat between a curious human and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the human's questions.",
        roles=("USER", "ASSISTANT"),
        seps=(" ", "</s>"),
    ),
}

Turn = Union[str, tuple[str, Union[str, None]], Mapping[str, object]]


def build_prompt(
    turns: str | Sequence[Turn], template: str = "vipllava", image_token: str = "<image>"
) -> str:
    """Builds a chat prompt; the last turn's answer is usually None (the model writes it).

    Args:
        turns: a single question; transformers' chat messages (`[{"role": "user", "content":
            [{"type": "image"}, {"type": "text", "text": ...}]}, {"role": "assistant", ...}]`,
            see `turns_from_messages`); or a list of turns, each a question string, a
            `(question, answer_or_None)` pair, or a dict `{"user": str, "assistant": str | None,
            "image": bool | int}`. `image` (the number of `<image>` placeholders put before the
            question, each followed by a newline) defaults to 1 for the first turn and 0 for
            the others.
        template: "vipllava" (the model card's format) or "llava_v1" (the original repository's).
        image_token: the placeholder string.

    Returns:
        The prompt string, e.g. for one turn with the "vipllava" template:
        `A chat between ... questions.###Human: <image>\\n{question}###Assistant:`.

    Raises:
        VipLlavaError: an unknown template, no turns, or a turn without an answer that is not
            the last one.
    """
    if template not in TEMPLATES:
        raise VipLlavaError(f"unknown template {template!r} (known: {sorted(TEMPLATES)})")
    style = TEMPLATES[template]
    if isinstance(turns, str):
        turns = [turns]
    if not turns:
        raise VipLlavaError("build_prompt needs at least one turn")
    if isinstance(turns[0], Mapping) and "role" in turns[0]:
        turns = turns_from_messages(turns)
    user, assistant = style.roles
    out = style.system + style.seps[0]
    for i, turn in enumerate(turns):
        question, answer, n_images = _parse_turn(turn, first=i == 0)
        if answer is None and i != len(turns) - 1:
            raise VipLlavaError(f"turn {i} has no answer but is not the last turn")
        out += f"{user}: {(image_token + chr(10)) * n_images}{question}{style.seps[0]}"
        out += f"{assistant}:" if answer is None else f"{assistant}: {answer}{style.seps[1]}"
    return out


def turns_from_messages(messages: Sequence[Mapping[str, object]]) -> list[dict[str, object]]:
    """transformers' chat messages -> `build_prompt` turns: each user message (its `{"type":
    "image"}` items become that many `<image>` placeholders, its text items joined by spaces)
    with the assistant message after it, if any. A "system" message is refused: the template
    has its own system text."""
    turns: list[dict[str, object]] = []
    for i, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        if not isinstance(content, Sequence) or not all(isinstance(c, Mapping) for c in content):
            raise VipLlavaError(f"message {i}: content must be a string or a list of {{'type': ...}} items")
        text = " ".join(str(c.get("text", "")) for c in content if c.get("type") == "text")
        images = sum(c.get("type") == "image" for c in content)
        if role == "user":
            turns.append({"user": text, "assistant": None, "image": images})
        elif role == "assistant" and turns and turns[-1]["assistant"] is None:
            turns[-1]["assistant"] = text
        else:
            raise VipLlavaError(f"message {i}: expected a 'user' message"
                                f"{' or the assistant answer' if turns else ''}, got role {role!r}")
    return turns


def _parse_turn(turn: Turn, first: bool) -> tuple[str, str | None, int]:
    """(question, answer, number of images) of one turn."""
    if isinstance(turn, str):
        return turn, None, int(first)
    if isinstance(turn, Mapping):
        if "user" not in turn:
            raise VipLlavaError(f"a turn dict needs a 'user' entry, got keys {sorted(turn)}")
        return str(turn["user"]), turn.get("assistant"), int(turn.get("image", first))
    question, answer = turn
    return question, answer, int(first)


def stop_tokens(tokenizer, template: str = "vipllava") -> tuple[list[int], list[str]]:
    """(token ids that end an answer, strings an answer's text is cut at): EOS, and the
    template's answer separator ("###" / "</s>"), as an id too when it is one token."""
    sep = TEMPLATES[template].seps[1]
    stops = [s for s in (sep, tokenizer.eos_token) if s]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    sep_ids = tokenizer.encode(sep, add_special_tokens=False)
    if len(sep_ids) == 1 and sep_ids[0] != tokenizer.unk_token_id and sep_ids[0] not in eos:
        eos.append(sep_ids[0])
    return eos, stops


def cut_answer(text: str, stops: Sequence[str]) -> str:
    """`text` up to the first stop string, stripped."""
    for s in stops:
        text = text.split(s, 1)[0]
    return text.strip()
