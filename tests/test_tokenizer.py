"""kandinsky.clip.Tokenizer on the real 49,408-token CLIP vocabulary.

Two references: open_clip's own SimpleTokenizer (checks that the vocabulary folder
written by the ``clip_tokenizer_folder`` fixture is the real CLIP BPE), and
transformers' CLIPTokenizer called exactly as diffusers' prior pipeline calls it
(what the pipeline reproduces).
"""
from __future__ import annotations

import pytest
import torch

from kandinsky.clip import Tokenizer
from tests.refs.clip import load_open_clip_tokenizer

BOS, EOS = 49406, 49407

# Prompts on which open_clip's text cleaning (ftfy + html unescape) and transformers'
# normaliser (NFC, whitespace, lowercase) agree.
PROMPTS = [
    "a photo of a cat",
    "",
    "A Photo Of A CAT",
    "Hello, World!!! ... ?! (really) [sic] {x} <tag> @user #hashtag $5 100% a/b c\\d",
    "café naïve résumé Ångström façade Straße",
    "emoji 🐱🚀 test 👩‍👩‍👧 ❤️",
    "日本語のテキスト, 中文, русский текст, ελληνικά, עברית",
    "it's we're they've I'm you'll he'd don't",
    "  lots   of\twhite\nspace  ",
    "numbers 1234567890 3.14159 1e-5",
    "an oil painting of a lighthouse in a storm, dramatic light, highly detailed, 4k, trending on artstation",
    "red " * 90,  # > 77 tokens: truncated
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
]

# Prompts where open_clip cleans text with ftfy / html.unescape and transformers (hence
# diffusers, hence kandinsky) does not: curly quotes, ligatures, HTML entities, full width.
DIVERGENT = ["don’t “curly” quotes", "ﬁ ligature", "fish &amp; chips", "Ｆｕｌｌ width"]


@pytest.fixture(scope="module")
def tokenizer(clip_tokenizer_folder):
    return Tokenizer.from_folder(clip_tokenizer_folder)


@pytest.fixture(scope="module")
def open_clip_tokenizer():
    return load_open_clip_tokenizer()


@pytest.fixture(scope="module")
def hf_tokenizer(clip_tokenizer_folder):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(clip_tokenizer_folder)


def test_vocabulary_is_the_real_clip_vocabulary(tokenizer, open_clip_tokenizer):
    assert tokenizer.vocab_size == 49408 == open_clip_tokenizer.vocab_size
    assert tokenizer.max_length == 77
    assert tokenizer.tokenizer.bos_token_id == BOS == open_clip_tokenizer.sot_token_id
    assert tokenizer.tokenizer.eos_token_id == EOS == open_clip_tokenizer.eot_token_id


@pytest.mark.filterwarnings("ignore:.*words are dropped")
def test_same_ids_as_open_clip(tokenizer, open_clip_tokenizer):
    ids, mask = tokenizer(PROMPTS)
    want = open_clip_tokenizer(PROMPTS)  # (B, 77), zero padded
    assert ids.shape == mask.shape == (len(PROMPTS), 77)
    assert ids.dtype == torch.long and mask.dtype == torch.bool
    lengths = (want != 0).sum(dim=1)
    assert torch.equal(mask.sum(dim=1), lengths)
    for row, n in enumerate(lengths.tolist()):
        assert torch.equal(ids[row, :n], want[row, :n]), PROMPTS[row]
        assert mask[row, :n].all() and not mask[row, n:].any()
        assert (ids[row, n:] == EOS).all()  # padded with <|endoftext|> (open_clip pads with 0)
    assert lengths.max() == 77  # the long prompt really was truncated ...
    assert ids[PROMPTS.index("red " * 90), -1] == EOS  # ... and still ends with <|endoftext|>
    assert lengths[PROMPTS.index("")] == 2  # empty prompt: <|startoftext|> <|endoftext|>


@pytest.mark.filterwarnings("ignore:.*words are dropped")
def test_same_as_transformers_as_diffusers_calls_it(tokenizer, hf_tokenizer):
    prompts = PROMPTS + DIVERGENT
    ids, mask = tokenizer(prompts)
    want = hf_tokenizer(prompts, padding="max_length", max_length=hf_tokenizer.model_max_length,
                        truncation=True, return_tensors="pt")
    assert torch.equal(ids, want.input_ids)
    assert torch.equal(mask, want.attention_mask.bool())


def test_known_divergence_from_open_clip(tokenizer, open_clip_tokenizer):
    """open_clip runs ftfy + html.unescape before BPE; transformers' CLIPTokenizer (and so
    diffusers and kandinsky) only applies NFC + whitespace + lowercase. Documented here."""
    ids, mask = tokenizer(DIVERGENT)
    want = open_clip_tokenizer(DIVERGENT)
    for row in range(len(DIVERGENT)):
        n = int(mask[row].sum())
        assert not torch.equal(ids[row, :n], want[row, :n]), DIVERGENT[row]


def test_single_string_and_errors(tokenizer, clip_tokenizer_folder, tmp_path):
    ids, mask = tokenizer("a cat")
    want_ids, want_mask = tokenizer(["a cat"])
    assert torch.equal(ids, want_ids) and torch.equal(mask, want_mask) and ids.shape == (1, 77)
    with pytest.raises(TypeError):
        tokenizer(["a cat", 3])
    with pytest.raises(ValueError, match="empty"):
        tokenizer([])
    with pytest.raises(FileNotFoundError, match="merges.txt"):
        (tmp_path / "vocab.json").write_text((clip_tokenizer_folder / "vocab.json").read_text())
        Tokenizer.from_folder(tmp_path)


# ----------------------------------------------------------------------------- prompts > 77 tokens
def _removed_as_diffusers_computes_it(hf_tokenizer, prompt: str) -> str:
    """diffusers' Kandinsky prior pipeline: the untruncated ids from position 76 up to the final
    <|endoftext|>, decoded (it logs them as 'the following part of your input was truncated')."""
    ids = hf_tokenizer([prompt], padding="longest", return_tensors="pt").input_ids
    return hf_tokenizer.batch_decode(ids[:, hf_tokenizer.model_max_length - 1 : -1])[0].strip()


def test_long_prompt_warns_naming_the_dropped_words(tokenizer, hf_tokenizer):
    words = "a red cat sitting on a wooden chair in a sunny garden with flowers and trees around".split()
    prompt = " ".join(words * 6)  # 96 words, one token each
    with pytest.warns(UserWarning, match="longer than CLIP's 75 tokens; these words are dropped") as record:
        ids, mask = tokenizer(prompt)
    assert len(record) == 1 and record[0].filename == __file__  # points at the caller's line
    removed = _removed_as_diffusers_computes_it(hf_tokenizer, prompt)
    assert removed == " ".join((words * 6)[75:])  # the maths: everything after the 75th word
    assert repr(removed) in str(record[0].message)
    assert mask.all() and ids[0, -1] == EOS  # still truncated exactly as before


def test_prompts_that_fit_do_not_warn(tokenizer, recwarn):
    tokenizer(["a cat", "cat " * 75])  # 75 tokens: exactly the capacity
    assert not [w for w in recwarn if "dropped" in str(w.message)]


def test_batch_names_which_prompt_and_the_first_dropped_word(tokenizer, hf_tokenizer):
    prompt = "cat " * 75 + "dog"  # 76 tokens: only "dog" is dropped
    with pytest.warns(UserWarning) as record:
        tokenizer(["a cat", prompt])
    messages = [str(w.message) for w in record if "dropped" in str(w.message)]
    assert messages == ["the prompt is longer than CLIP's 75 tokens; these words are dropped: 'dog'. "
                        "Shorten it, or put what matters first."]  # one long prompt in the batch: "the prompt"
    assert _removed_as_diffusers_computes_it(hf_tokenizer, prompt) == "dog"
    with pytest.warns(UserWarning) as record:
        tokenizer(["a cat", prompt, "dog " * 75 + "cat"])  # two long ones: named by their beginnings
    messages = [str(w.message) for w in record if "dropped" in str(w.message)]
    assert [m.split(" is longer")[0] for m in messages] == [
        f"the prompt starting {prompt[:20] + '...'!r}", f"the prompt starting {'dog ' * 5 + '...'!r}"]
