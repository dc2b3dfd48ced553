"""transformers' chat messages as prompts: the same text as the turns they stand for."""

import pytest

from vipllava_jax.errors import VipLlavaError
from vipllava_jax.processing.prompts import build_prompt, turns_from_messages


def user(text, images=0):
    return {"role": "user", "content": [{"type": "image"}] * images + [{"type": "text", "text": text}]}


def test_messages_give_the_prompt_of_their_turns():
    one = [user("What is within the red rectangle?", images=1)]
    assert build_prompt(one) == build_prompt("What is within the red rectangle?")
    two = [user("Describe the image.", images=1), {"role": "assistant", "content": "A cat."},
           user("And the arrow?")]
    for template in ("vipllava", "llava_v1"):
        assert build_prompt(two, template=template) == build_prompt(
            [("Describe the image.", "A cat."), ("And the arrow?", None)], template=template)
    assert turns_from_messages([user("Two images?", images=2)])[0]["image"] == 2
    text_only = [{"role": "user", "content": "plain text"}]  # content as a string: no image
    assert build_prompt(text_only) == build_prompt([{"user": "plain text", "image": 0}])


@pytest.mark.parametrize("messages", [
    [{"role": "system", "content": "You are terse."}, user("Hi")],
    [{"role": "assistant", "content": "Hello"}],
    [user("Hi"), {"role": "user", "content": 3}],
])
def test_bad_messages_are_one_line_errors(messages):
    with pytest.raises(VipLlavaError, match="message"):
        build_prompt(messages)
