"""The llava_v1 template's token ids and training labels against the original's rules.

The reference below re-implements, from the original repository's facts (conversation
`conv_llava_v1`: roles USER / ASSISTANT, sep " ", sep2 "</s>", `SeparatorStyle.TWO`'s
`get_prompt`; `train.py`'s `preprocess_v1` masking), what ViP-LLaVA feeds its model, and runs it
with a Llama-like tokenizer built here: `<unk>`, `<s>`, `</s>` at ids 0-2, `<s>` prepended,
sentencepiece's spacing (a space becomes "▁" and starts the next piece; the text's start gets
one; "ASSISTANT: " ends in a lone "▁", which is why `preprocess_v1` subtracts 2).
"""

import re

import numpy as np
import pytest

from vipllava_jax.nn.losses import IGNORE_INDEX
from vipllava_jax.processing.processor import VipLlavaProcessor
from vipllava_jax.processing.prompts import build_prompt
from vipllava_jax.train.data.conversations import ConversationEncoder, conversation_prompt

SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. The assistant "
          "gives helpful, detailed, and polite answers to the human's questions.")
NUM_IMAGE_TOKENS = 5
TURNS = [
    ("<image>\nWhat is within the red rectangle?", "A brown dog"),
    ("Is it near the blue ellipse?", "No, it is far away."),
]
SPECIALS = ["<unk>", "<s>", "</s>", "<image>"]


def original_prompt(turns, answered=True):
    """`Conversation.get_prompt` for `SeparatorStyle.TWO` with conv_llava_v1's fields."""
    seps = [" ", "</s>"]
    messages = [m for q, a in turns for m in (("USER", q), ("ASSISTANT", a))]
    if not answered:
        messages[-1] = ("ASSISTANT", None)
    out = SYSTEM + seps[0]
    for i, (role, message) in enumerate(messages):
        out += f"{role}: {message}{seps[i % 2]}" if message is not None else f"{role}:"
    return out


def original_labels(prompt, encode):
    """`preprocess_v1`'s masking: per round (the prompt split at sep2), everything up to
    "ASSISTANT: " is ignored; the answer and the sep2 token after it are learnt."""
    ids = encode(prompt)
    target = list(ids)
    sep = " ASSISTANT: "
    cur = 1
    target[:cur] = [IGNORE_INDEX]
    for rou in prompt.split("</s>"):
        if rou == "":
            break
        parts = rou.split(sep)
        if len(parts) != 2:
            break
        round_len = len(encode(rou))  # its <s> stands for the </s> that ends the round
        instruction_len = len(encode(parts[0] + sep)) - 2  # less <s> and the trailing "▁"
        target[cur:cur + instruction_len] = [IGNORE_INDEX] * instruction_len
        cur += round_len
    target[cur:] = [IGNORE_INDEX] * (len(target) - cur)
    assert cur == len(ids), "tokenization mismatch (the original masks the whole row then)"
    return ids, target


@pytest.fixture(scope="module")
def processor():
    return make_processor()


def make_processor():
    """A VipLlavaProcessor around the Llama-like word tokenizer of this file's texts."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    metaspace = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    texts = [original_prompt(TURNS[:n], answered) for n in (1, 2) for answered in (True, False)]
    pieces = set()
    for text in texts:
        for round_ in text.split("</s>"):
            for segment in re.split("|".join(map(re.escape, SPECIALS)), round_ + " ASSISTANT: "):
                for piece, _ in metaspace.pre_tokenize_str(segment):
                    pieces |= {piece, piece.removeprefix("▁") or piece}  # at a text's start or not
    vocab = {t: i for i, t in enumerate(SPECIALS + sorted(pieces))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = metaspace
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.add_special_tokens([AddedToken(t, normalized=False) for t in SPECIALS])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return VipLlavaProcessor(fast, image_size=8, num_image_tokens=NUM_IMAGE_TOKENS)


def _encode(processor):
    def encode(text):
        ids = processor.tokenizer(text).input_ids
        assert 0 not in ids, f"<unk> in {text!r}: the test vocabulary misses a piece"
        return ids
    return encode


@pytest.mark.parametrize("n", [1, 2])
def test_prompt_ids_are_the_originals(processor, n):
    encode = _encode(processor)
    turns = TURNS[:n]
    # inference: the prompt ends at "ASSISTANT:", the model writes the rest
    asked = [*turns[:-1], (turns[-1][0], None)]
    ours = build_prompt([(q.replace("<image>\n", ""), a) for q, a in asked], template="llava_v1")
    assert ours == original_prompt(turns, answered=False)
    assert encode(ours) == encode(original_prompt(turns, answered=False))
    # training: the answered conversation
    prompt, _ = conversation_prompt(turns, "llava_v1")
    assert prompt == original_prompt(turns)
    ids = encode(prompt)
    assert ids[0] == 1 and ids.count(2) == n  # <s> first, one </s> per answer
    assert ids[ids.index(processor.image_token_id) - 1] == processor.tokenizer.convert_tokens_to_ids("▁")


@pytest.mark.parametrize("n", [1, 2])
def test_training_labels_are_the_originals(processor, n):
    turns = TURNS[:n]
    conversations = [m for q, a in turns for m in ({"from": "human", "value": q}, {"from": "gpt", "value": a})]
    example = ConversationEncoder(processor, "llava_v1")(conversations)
    # the original keeps one image placeholder in the ids; ours expands it to the image's tokens
    k = example.image_start
    assert (example.input_ids[k:k + NUM_IMAGE_TOKENS] == processor.image_token_id).all()
    assert (example.labels[k:k + NUM_IMAGE_TOKENS] == IGNORE_INDEX).all()
    ids = np.delete(example.input_ids, range(k + 1, k + NUM_IMAGE_TOKENS)).tolist()
    labels = np.delete(example.labels, range(k + 1, k + NUM_IMAGE_TOKENS)).tolist()

    want_ids, want_labels = original_labels(original_prompt(turns), _encode(processor))
    assert ids == want_ids
    assert labels == want_labels
    # what is learnt: each answer ("▁A", "▁brown", "▁dog") and its </s>
    learnt = processor.tokenizer.convert_ids_to_tokens([t for t in labels if t != IGNORE_INDEX])
    assert learnt[:4] == ["▁A", "▁brown", "▁dog", "</s>"] and learnt.count("</s>") == n
