"""TokenScorer and sequence_cross_entropy on real transformers models (small random configs).

Reference: plain autograd in float64 with the same probes (curvkern.torch_ops.rademacher) and the
same token mask, i.e. curvature = mean_k ||m * (g(e + h m*r_k) - g(e))|| / h with g the gradient
of the per-sequence loss in the embeddings e. The two compute the same float64 numbers in a
different order, so they agree to ~1e-12 relative; tolerances of 1e-9 leave room for summation
order and nothing else. fd against hvp differ by O(h) (smooth GELU models): with h = 1e-4 and
curvatures O(1), the second-order term is ~1e-4 relative, so 1e-3 is the bound.
"""

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from curvkern import torch_ops
from curvkern.losses import sequence_cross_entropy
from curvkern.text import TokenScorer

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

VOCAB, HIDDEN, PAD = 40, 16, 0
H = 1e-4
EXACT = {"rtol": 1e-9, "atol": 1e-12}


def bert(num_labels: int = 3, dtype=torch.float64):
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=32, num_labels=num_labels,
        pad_token_id=PAD,
    )  # fmt: skip
    return transformers.BertForSequenceClassification(config).to(dtype).eval()


def gpt2(dtype=torch.float64, **kwargs):
    torch.manual_seed(1)
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=2, n_positions=32,
        bos_token_id=1, eos_token_id=1, pad_token_id=PAD, **kwargs,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config).to(dtype).eval()


def sequences(lengths, seed=0):
    """Token id lists of the given lengths (ids 1 .. VOCAB-1; 0 is padding)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (n,), generator=gen) for n in lengths]


def pad(seqs, side="right", length=None):
    """(input_ids, attention_mask), each (B, T): sequences padded on ``side`` with PAD."""
    length = length or max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), PAD)
    mask = torch.zeros(len(seqs), length, dtype=torch.long)
    for b, s in enumerate(seqs):
        span = slice(0, len(s)) if side == "right" else slice(length - len(s), length)
        ids[b, span], mask[b, span] = s, 1
    return ids, mask


def lm_labels(input_ids, attention_mask):
    return input_ids.masked_fill(attention_mask == 0, -100)


def reference(model, loss_fn, input_ids, y, ids, mask, attention_mask, n_probes, h=H, seed=0):
    """Plain-autograd fd curvature (B,) and per-token map (B, T) with the scorer's probes."""
    e = model.get_input_embeddings()(input_ids).detach()  # (B, T, E)
    m = mask.to(e.dtype).unsqueeze(-1)  # (B, T, 1)

    def grad(x):
        x = x.detach().requires_grad_(True)
        loss = loss_fn(model(inputs_embeds=x, attention_mask=attention_mask), y)
        return torch.autograd.grad(loss.sum(), x)[0]

    g0 = grad(e)
    r = torch_ops.rademacher(seed, torch.as_tensor(ids), n_probes, e.shape[1:], 0, 0, e.dtype)
    norms, maps = [], []
    for k in range(n_probes):
        dg = m * (grad(e + h * m * r[k]) - g0)
        norms.append(torch.linalg.vector_norm(dg.flatten(1), dim=1) / h)
        maps.append(torch.linalg.vector_norm(dg, dim=2) / h)
    return torch.stack(norms).mean(0), torch.stack(maps).mean(0)


def classification_loss(output, y):
    return F.cross_entropy(output.logits, y, reduction="none")


# ---------------------------------------------------------------------------------------------
# sequence_cross_entropy


def test_sequence_cross_entropy_against_token_losses():
    torch.manual_seed(0)
    logits = torch.randn(3, 6, 5, dtype=torch.float64)
    labels = torch.randint(0, 5, (3, 6))
    labels[1, 4:] = -100
    labels[2, :] = -100  # no target at all
    for shift in (True, False):
        got = sequence_cross_entropy(logits, labels, shift=shift)
        for b in range(2):
            lg, lb = (logits[b, :-1], labels[b, 1:]) if shift else (logits[b], labels[b])
            keep = lb != -100
            want = F.cross_entropy(lg[keep], lb[keep])
            torch.testing.assert_close(got[b], want, rtol=1e-12, atol=0)
        assert math.isnan(got[2])


def test_sequence_cross_entropy_ignores_padding_and_other_rows():
    torch.manual_seed(0)
    logits = torch.randn(2, 8, 5, dtype=torch.float64)
    labels = torch.randint(0, 5, (2, 8))
    labels[0, 5:] = -100
    alone = sequence_cross_entropy(logits[:1, :5], labels[:1, :5])
    together = sequence_cross_entropy(logits, labels)
    torch.testing.assert_close(together[0], alone[0], rtol=1e-12, atol=0)
    custom = sequence_cross_entropy(logits, labels.masked_fill(labels == -100, 7), ignore_index=7)
    torch.testing.assert_close(custom, together, rtol=0, atol=0)


def test_sequence_cross_entropy_errors():
    with pytest.raises(ValueError, match=r"\(B, T, V\)"):
        sequence_cross_entropy(torch.randn(2, 5), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="labels must have shape"):
        sequence_cross_entropy(torch.randn(2, 5, 3), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        sequence_cross_entropy(torch.randn(2, 5, 3), torch.zeros(2, 5))


# ---------------------------------------------------------------------------------------------
# TokenScorer against plain autograd


def test_bert_classifier_matches_autograd():
    model = bert()
    input_ids, attention_mask = pad(sequences([7, 4, 6]))
    y = torch.tensor([0, 2, 1])
    probe_mask = torch.ones_like(input_ids)
    probe_mask[:, 0] = 0  # the [CLS] position unperturbed
    ids = torch.tensor([5, 11, 2])
    scorer = TokenScorer(model, h=H, n_probes=3, backend="torch")
    out = scorer.score(
        input_ids, y, ids, attention_mask=attention_mask, probe_mask=probe_mask,
        per_position=True,
    )  # fmt: skip
    mask = attention_mask.bool() & probe_mask.bool()
    want, want_map = reference(model, classification_loss, input_ids, y, ids, mask,
                               attention_mask, 3)  # fmt: skip
    torch.testing.assert_close(out.curvature, want, **EXACT)
    torch.testing.assert_close(out.curvature_map, want_map, **EXACT)
    assert bool((out.curvature_map[~mask] == 0).all())
    assert out.curvature.dtype == torch.float64 and bool((out.curvature > 0).all())


def test_gpt2_causal_lm_matches_autograd():
    model = gpt2()
    input_ids, attention_mask = pad(sequences([9, 5, 7], seed=1))
    labels = lm_labels(input_ids, attention_mask)
    scorer = TokenScorer(model, sequence_cross_entropy, h=H, n_probes=3, backend="torch")
    out = scorer.score(input_ids, labels, attention_mask=attention_mask, per_position=True)
    want, want_map = reference(
        model, sequence_cross_entropy, input_ids, labels, torch.arange(3),
        attention_mask.bool(), attention_mask, 3,
    )  # fmt: skip
    torch.testing.assert_close(out.curvature, want, **EXACT)
    torch.testing.assert_close(out.curvature_map, want_map, **EXACT)
    with torch.no_grad():
        loss = sequence_cross_entropy(model(input_ids, attention_mask=attention_mask), labels)
    torch.testing.assert_close(out.loss, loss, **EXACT)


def test_kernels_and_torch_backends_agree():
    pytest.importorskip("curvkern._C", reason="compiled kernels not built")
    model = gpt2()
    input_ids, attention_mask = pad(sequences([6, 8], seed=2))
    labels = lm_labels(input_ids, attention_mask)
    args = (input_ids, labels)
    kwargs = {"attention_mask": attention_mask, "probe_mask": input_ids > 20}
    a = TokenScorer(model, sequence_cross_entropy, h=H, n_probes=4, backend="torch")
    b = TokenScorer(model, sequence_cross_entropy, h=H, n_probes=4, backend="kernels")
    torch.testing.assert_close(b.score(*args, **kwargs).curvature,
                               a.score(*args, **kwargs).curvature, **EXACT)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Padding


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_scores_do_not_depend_on_padding(kind, side):
    """Each sequence scored alone (no padding) equals it scored in a padded batch."""
    model = bert() if kind == "bert" else gpt2()
    loss_fn = None if kind == "bert" else sequence_cross_entropy
    seqs = sequences([8, 3, 5], seed=3)
    ids = torch.tensor([4, 9, 1])
    labels = torch.tensor([2, 0, 1])
    scorer = TokenScorer(model, loss_fn, h=H, n_probes=3, backend="torch")

    def target(input_ids, attention_mask, rows):
        return lm_labels(input_ids, attention_mask) if kind == "gpt2" else labels[rows]

    input_ids, attention_mask = pad(seqs, side, length=10)
    batch = scorer.score(input_ids, target(input_ids, attention_mask, slice(None)), ids,
                         attention_mask=attention_mask, per_position=True)  # fmt: skip
    for b, s in enumerate(seqs):
        one = s.unsqueeze(0)
        alone = scorer.score(one, target(one, torch.ones_like(one), [b]), ids[b : b + 1],
                             per_position=True)  # fmt: skip
        for field in ("curvature", "trace", "loss", "grad_norm"):
            torch.testing.assert_close(getattr(batch, field)[b], getattr(alone, field)[0],
                                       **EXACT, msg=f"{field} of sequence {b}")  # fmt: skip
        real = attention_mask[b].bool()
        torch.testing.assert_close(batch.curvature_map[b, real], alone.curvature_map[0], **EXACT)
        assert bool((batch.curvature_map[b, ~real] == 0).all())


def test_padding_labels_that_count_warn():
    model = gpt2()
    input_ids, attention_mask = pad(sequences([5, 3]))
    scorer = TokenScorer(model, sequence_cross_entropy, n_probes=1, backend="torch")
    with pytest.warns(UserWarning, match=r"labels\[attention_mask == 0\] = -100"):
        scorer.score(input_ids, input_ids, attention_mask=attention_mask)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scorer.score(input_ids, lm_labels(input_ids, attention_mask), attention_mask=attention_mask)


# ---------------------------------------------------------------------------------------------
# Per-token map, probe masks


def test_probe_mask_scores_only_the_masked_tokens():
    """Response-only scoring: prompt tokens are never perturbed, and the map is 0 there."""
    model = gpt2()
    input_ids, attention_mask = pad(sequences([9, 9], seed=4))
    labels = lm_labels(input_ids, attention_mask)
    response = torch.zeros_like(input_ids)
    response[:, 5:] = 1
    scorer = TokenScorer(model, sequence_cross_entropy, h=H, n_probes=4, backend="torch")
    out = scorer.score(input_ids, labels, attention_mask=attention_mask, probe_mask=response,
                       per_position=True)  # fmt: skip
    want, want_map = reference(model, sequence_cross_entropy, input_ids, labels,
                               torch.arange(2), response.bool(), attention_mask, 4)  # fmt: skip
    torch.testing.assert_close(out.curvature, want, **EXACT)
    torch.testing.assert_close(out.curvature_map, want_map, **EXACT)
    assert bool((out.curvature_map[:, :5] == 0).all())
    # The last token predicts nothing: the loss does not depend on its embedding.
    assert bool((out.curvature_map[:, 5:-1] > 0).all()) and bool(
        (out.curvature_map[:, -1] == 0).all()
    )
    whole = scorer.score(input_ids, labels, attention_mask=attention_mask)
    assert bool((whole.curvature > out.curvature).all())


# ---------------------------------------------------------------------------------------------
# hvp through attention


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_hvp_through_sdpa_attention_agrees_with_fd(kind):
    model = bert() if kind == "bert" else gpt2()
    assert model.config._attn_implementation == "sdpa"  # the fused kernels, no double backward
    input_ids, attention_mask = pad(sequences([6, 4], seed=5))
    y = torch.tensor([1, 0]) if kind == "bert" else lm_labels(input_ids, attention_mask)
    loss_fn = None if kind == "bert" else sequence_cross_entropy
    kwargs = {"attention_mask": attention_mask}
    hvp = TokenScorer(model, loss_fn, method="hvp", n_probes=3, backend="torch").score(
        input_ids, y, **kwargs
    )

    def fd(h):
        return TokenScorer(model, loss_fn, h=h, n_probes=3, backend="torch").score(
            input_ids, y, **kwargs
        )

    torch.testing.assert_close(hvp.curvature, fd(H).curvature, rtol=1e-3, atol=0)
    # The trace's O(h) term, (h / 2) T[r, r, r] with T the third derivative, is larger relative
    # to the trace (the embeddings' scale is ~0.02 and LayerNorm divides by it, so each
    # derivative order gains ~1/0.02): check first-order convergence instead of a fixed bound.
    # Halving h halves the error (ratio 0.5 + O(h)); float64 rounding is ~1e-16 / h, negligible.
    ratio = (fd(H / 2).trace - hvp.trace).abs() / (fd(H).trace - hvp.trace).abs()
    assert bool(((ratio > 0.4) & (ratio < 0.6)).all()), ratio


class FusedAttentionLM(torch.nn.Module):
    """A one-layer model that calls a fused attention kernel directly (no double backward),
    as attention implementations outside scaled_dot_product_attention do."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(VOCAB, HIDDEN)
        self.head = torch.nn.Linear(HIDDEN, VOCAB)

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids, attention_mask=None):
        q = self.embed(input_ids).unsqueeze(1)  # (B, 1, T, E): one head
        out = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, q, q, is_causal=True)[0]
        return self.head(out.squeeze(1))


def test_hvp_without_double_backward_names_the_fix():
    model = FusedAttentionLM()
    input_ids = torch.randint(1, VOCAB, (2, 5))
    scorer = TokenScorer(model, sequence_cross_entropy, method="hvp", n_probes=1, backend="torch")
    with pytest.raises(RuntimeError, match="attn_implementation='eager'.*method='fd'"):
        scorer.score(input_ids, input_ids)
    fd = TokenScorer(model, sequence_cross_entropy, n_probes=1, backend="torch")
    assert bool(torch.isfinite(fd.score(input_ids, input_ids).curvature).all())


# ---------------------------------------------------------------------------------------------
# Precision, errors


def test_bfloat16_model_refuses_fd_and_says_what_to_do():
    model = gpt2(dtype=torch.bfloat16)
    input_ids, attention_mask = pad(sequences([5, 4]))
    labels = lm_labels(input_ids, attention_mask)
    fd = TokenScorer(model, sequence_cross_entropy, n_probes=2, backend="torch")
    with pytest.raises(TypeError, match=r"bfloat16.*float32 copy.*method='hvp'"):
        fd.score(input_ids, labels, attention_mask=attention_mask)
    hvp = TokenScorer(model, sequence_cross_entropy, method="hvp", n_probes=2, backend="torch")
    out = hvp.score(input_ids, labels, attention_mask=attention_mask)
    assert bool(torch.isfinite(out.curvature).all()) and bool((out.curvature > 0).all())
    # The advice works: a float32 copy scores with fd.
    fd32 = TokenScorer(copy.deepcopy(model).float(), sequence_cross_entropy, n_probes=2,
                       h=1e-2, backend="torch")  # fmt: skip
    assert bool(torch.isfinite(fd32.score(input_ids, labels, attention_mask=attention_mask)
                               .curvature).all())  # fmt: skip


def test_errors_name_the_argument():
    with pytest.raises(TypeError, match="get_input_embeddings"):
        TokenScorer(torch.nn.Linear(3, 3))
    model = gpt2()
    scorer = TokenScorer(model, sequence_cross_entropy, n_probes=1)
    input_ids = torch.randint(1, VOCAB, (2, 5))
    with pytest.raises(TypeError, match="input_ids must hold integer token ids"):
        scorer.score(input_ids.double(), input_ids)
    with pytest.raises(ValueError, match=r"input_ids must be a \(B, T\)"):
        scorer.score(input_ids[0], input_ids)
    with pytest.raises(ValueError, match=r"attention_mask must have the shape of input_ids"):
        scorer.score(input_ids, input_ids, attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="probe_mask must hold 0/1"):
        scorer.score(input_ids, input_ids, probe_mask=torch.full((2, 5), 2))
    with pytest.raises(TypeError, match="input_key is not an option"):
        TokenScorer(model, input_key="x")


# ---------------------------------------------------------------------------------------------
# Across Hugging Face architectures (small random configs, float64)
#
# TokenScorer scores at the embedding module the model itself calls on input_ids, so its loss is
# the model's own, and its curvature is that of the model's own function of that module's output
# a. Plain autograd reaches the same function through inputs_embeds: the model computes
# inputs_embeds = a on that path, except the four architectures that scale the embeddings only on
# the input_ids path (their encoders: embed_tokens(input_ids) * embed_scale), where it is
# inputs_embeds = a * embed_scale.

_DECODER = dict(
    vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=2,
    num_attention_heads=2, max_position_embeddings=32, pad_token_id=PAD, bos_token_id=1,
    eos_token_id=2,
)  # fmt: skip
_SEQ2SEQ = dict(
    vocab_size=VOCAB, d_model=HIDDEN, encoder_layers=1, decoder_layers=1,
    encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
    decoder_ffn_dim=32, max_position_embeddings=32, pad_token_id=PAD, bos_token_id=1,
    eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None,
)  # fmt: skip
# name: (kind, config class, model class, config arguments, scales on the input_ids path only)
ARCHITECTURES = {
    "gpt2": ("causal", "GPT2Config", "GPT2LMHeadModel", dict(
        vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=2, n_positions=32, pad_token_id=PAD,
        bos_token_id=1, eos_token_id=2), False),
    "llama": ("causal", "LlamaConfig", "LlamaForCausalLM", dict(_DECODER, num_key_value_heads=1),
              False),
    "mistral": ("causal", "MistralConfig", "MistralForCausalLM",
                dict(_DECODER, num_key_value_heads=1), False),
    "gemma": ("causal", "GemmaConfig", "GemmaForCausalLM",
              dict(_DECODER, num_key_value_heads=1, head_dim=8), False),
    "qwen2": ("causal", "Qwen2Config", "Qwen2ForCausalLM", dict(_DECODER, num_key_value_heads=1),
              False),
    "phi": ("causal", "PhiConfig", "PhiForCausalLM", _DECODER, False),
    "opt": ("causal", "OPTConfig", "OPTForCausalLM", dict(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, ffn_dim=32,
        num_attention_heads=2, max_position_embeddings=32, word_embed_proj_dim=HIDDEN,
        pad_token_id=PAD, bos_token_id=1, eos_token_id=2), False),
    "bloom": ("causal", "BloomConfig", "BloomForCausalLM", dict(
        vocab_size=VOCAB, hidden_size=HIDDEN, n_layer=2, n_head=2, pad_token_id=PAD,
        bos_token_id=1, eos_token_id=2), False),
    "gpt_neox": ("causal", "GPTNeoXConfig", "GPTNeoXForCausalLM", _DECODER, False),
    "falcon": ("causal", "FalconConfig", "FalconForCausalLM", dict(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2,
        pad_token_id=PAD, bos_token_id=1, eos_token_id=2), False),
    "xglm": ("causal", "XGLMConfig", "XGLMForCausalLM", dict(
        vocab_size=VOCAB, d_model=HIDDEN, num_layers=2, attention_heads=2, ffn_dim=32,
        max_position_embeddings=32, pad_token_id=PAD, bos_token_id=1, eos_token_id=2), False),
    "bert": ("masked", "BertConfig", "BertForMaskedLM", _DECODER, False),
    "roberta": ("masked", "RobertaConfig", "RobertaForMaskedLM", dict(_DECODER, pad_token_id=1),
                False),
    "t5": ("seq2seq", "T5Config", "T5ForConditionalGeneration", dict(
        vocab_size=VOCAB, d_model=HIDDEN, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1,
        num_heads=2, pad_token_id=PAD, eos_token_id=2, decoder_start_token_id=PAD), False),
    "bart": ("seq2seq", "BartConfig", "BartForConditionalGeneration", _SEQ2SEQ, False),
    "marian": ("seq2seq", "MarianConfig", "MarianMTModel", dict(_SEQ2SEQ, scale_embedding=True),
               True),
    "pegasus": ("seq2seq", "PegasusConfig", "PegasusForConditionalGeneration",
                dict(_SEQ2SEQ, scale_embedding=True), True),
    "mvp": ("seq2seq", "MvpConfig", "MvpForConditionalGeneration",
            dict(_SEQ2SEQ, scale_embedding=True), True),
    "blenderbot_small": ("seq2seq", "BlenderbotSmallConfig",
                         "BlenderbotSmallForConditionalGeneration",
                         dict(_SEQ2SEQ, scale_embedding=True), True),
}  # fmt: skip


@pytest.fixture
def float64_default():
    # XGLM's attention builds torch.full((), finfo(float64).min) in the default dtype: a float64
    # model needs float64 as the default.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def architecture(name):
    """(model, kind, the embedding's scale on the input_ids path only)."""
    kind, config, cls, kwargs, scaled = ARCHITECTURES[name]
    torch.manual_seed(0)
    model = getattr(transformers, cls)(getattr(transformers, config)(**kwargs)).double().eval()
    scale = model.get_encoder().embed_scale if scaled else 1.0
    return model, kind, scale


def token_loss(kind):
    def loss_fn(output, y):
        return sequence_cross_entropy(output, y, shift=kind == "causal")

    return loss_fn


def decoder_labels(lengths, length=None, seed=7):
    """(B, T') decoder labels, right-padded with -100 (and the unpadded label lists)."""
    seqs = sequences(lengths, seed=seed)
    ids, mask = pad(seqs, "right", length)
    return ids.masked_fill(mask == 0, -100), seqs


def targets(kind, input_ids, attention_mask, dec):
    """y and the model inputs for an architecture of ``kind``: a causal LM's labels are its
    input ids, a masked LM's too (no shift), an encoder-decoder's its decoder labels (which
    also make its decoder inputs)."""
    if kind == "seq2seq":
        return dec, {"labels": dec}
    return lm_labels(input_ids, attention_mask), {}


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_loss_is_the_models_own_loss(name, side, float64_default):
    """Each sequence's loss in a padded batch equals the model's own loss on its input_ids."""
    model, kind, _ = architecture(name)
    seqs = sequences([7, 4], seed=11)
    dec, dec_seqs = decoder_labels([5, 3])
    input_ids, attention_mask = pad(seqs, side)
    y, inputs = targets(kind, input_ids, attention_mask, dec)
    scorer = TokenScorer(model, token_loss(kind), h=H, n_probes=1, backend="torch")
    out = scorer.score(input_ids, y, attention_mask=attention_mask, **inputs)
    for b, s in enumerate(seqs):
        labels = dec_seqs[b] if kind == "seq2seq" else s
        with torch.no_grad():
            own = model(input_ids=s[None], labels=labels[None]).loss
        # Bloom returns its own loss in float32 even for a float64 model: a few float32 ulps of
        # a loss of order one then.
        tol = EXACT if own.dtype == torch.float64 else {"rtol": 8 * 2.0**-23, "atol": 0}
        torch.testing.assert_close(out.loss[b], own.double(), **tol, msg=f"{name}, seq. {b}")


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_curvature_is_that_of_the_models_own_function(name, float64_default):
    """Curvature at the embedding module's output, against plain autograd of the model's own
    function of it (reached through inputs_embeds, scaled where the model scales only the
    input_ids path: Marian, Pegasus, MVP, BlenderbotSmall)."""
    model, kind, scale = architecture(name)
    input_ids, attention_mask = pad(sequences([6, 6], seed=12))
    dec, _ = decoder_labels([4, 3])
    y, inputs = targets(kind, input_ids, attention_mask, dec)
    loss_fn = token_loss(kind)
    scorer = TokenScorer(model, loss_fn, h=H, n_probes=2, backend="torch")
    out = scorer.score(input_ids, y, **inputs)
    e = scorer.embed(input_ids)

    def grad(v):
        v = v.detach().requires_grad_(True)
        loss = loss_fn(model(inputs_embeds=v * scale, **inputs), y)
        return torch.autograd.grad(loss.sum(), v)[0]

    r = torch_ops.rademacher(0, torch.arange(2), 2, e.shape[1:], 0, 0, e.dtype)
    g0 = grad(e)
    want = torch.stack(
        [torch.linalg.vector_norm((grad(e + H * r[k]) - g0).flatten(1), dim=1) / H
         for k in range(2)]
    ).mean(0)  # fmt: skip
    torch.testing.assert_close(out.curvature, want, **EXACT)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("name", ["t5", "marian", "pegasus", "bart"])
def test_encoder_decoder_scores_do_not_depend_on_padding(name, side, float64_default):
    """Encoder padded on either side, decoder inputs and labels of the same length (which must
    not move with the encoder's padding): each sequence alone equals it in the batch."""
    model, kind, _ = architecture(name)
    seqs = sequences([8, 3, 5], seed=13)
    dec, dec_seqs = decoder_labels([4, 6, 2], length=10)
    input_ids, attention_mask = pad(seqs, side, length=10)
    ids = torch.tensor([4, 9, 1])
    scorer = TokenScorer(model, token_loss(kind), h=H, n_probes=2, backend="torch")
    batch = scorer.score(input_ids, dec, ids, attention_mask=attention_mask, per_position=True,
                         labels=dec)  # fmt: skip
    for b, s in enumerate(seqs):
        labels = dec_seqs[b][None]
        alone = scorer.score(s[None], labels, ids[b : b + 1], per_position=True, labels=labels)
        for field in ("curvature", "trace", "loss", "grad_norm"):
            torch.testing.assert_close(getattr(batch, field)[b], getattr(alone, field)[0],
                                       **EXACT, msg=f"{field} of sequence {b}")  # fmt: skip
        real = attention_mask[b].bool()
        torch.testing.assert_close(batch.curvature_map[b, real], alone.curvature_map[0], **EXACT)
        assert bool((batch.curvature_map[b, ~real] == 0).all())


def test_padding_label_warning_only_where_padding_reaches_the_loss(float64_default):
    model, kind, _ = architecture("t5")
    input_ids, attention_mask = pad(sequences([6, 3], seed=14), "left")
    dec = torch.randint(3, VOCAB, (2, 6))  # real decoder labels under the encoder's padding
    scorer = TokenScorer(model, token_loss(kind), n_probes=1, backend="torch")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scorer.score(input_ids, dec, attention_mask=attention_mask, labels=dec)
    decoder_mask = torch.ones_like(dec)
    decoder_mask[1, 4:] = 0
    with pytest.raises(UserWarning, match=r"labels\[decoder_attention_mask == 0\] = -100"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            scorer.score(input_ids, dec, attention_mask=attention_mask, labels=dec,
                         decoder_attention_mask=decoder_mask)  # fmt: skip


class SharedEmbedding(torch.nn.Module):
    """An encoder-decoder whose one embedding module embeds the decoder's ids first, then the
    encoder's: TokenScorer must find the call on input_ids, not assume it is the first."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.embed = torch.nn.Embedding(VOCAB, HIDDEN)
        self.mix = torch.nn.Linear(2 * HIDDEN, HIDDEN)
        self.head = torch.nn.Linear(HIDDEN, VOCAB)

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids, attention_mask=None, decoder_input_ids=None):
        return self.decode(self.embed(decoder_input_ids), self.embed(input_ids), attention_mask)

    def decode(self, d, e, attention_mask):
        m = attention_mask[:, :, None].to(e.dtype)
        pooled = (torch.tanh(e) * m).sum(1, keepdim=True) / m.sum(1, keepdim=True)
        return self.head(torch.tanh(self.mix(torch.cat([d, pooled.expand_as(d)], -1))))


def test_shared_embedding_is_scored_at_its_call_on_input_ids():
    model = SharedEmbedding().double().eval()
    input_ids, attention_mask = pad(sequences([5, 3], seed=15))
    dec = torch.randint(1, VOCAB, (2, 4))
    loss_fn = token_loss("masked")
    scorer = TokenScorer(model, loss_fn, h=H, n_probes=2, backend="torch")
    out = scorer.score(input_ids, dec, attention_mask=attention_mask, decoder_input_ids=dec)
    d = model.embed(dec).detach()
    e = model.embed(input_ids).detach()
    m = attention_mask[:, :, None].double()

    def grad(v):
        v = v.detach().requires_grad_(True)
        loss = loss_fn(model.decode(d, v, attention_mask), dec)
        return torch.autograd.grad(loss.sum(), v)[0]

    r = torch_ops.rademacher(0, torch.arange(2), 2, e.shape[1:], 0, 0, e.dtype)
    g0 = grad(e)
    want = torch.stack(
        [torch.linalg.vector_norm((m * (grad(e + H * m * r[k]) - g0)).flatten(1), dim=1) / H
         for k in range(2)]
    ).mean(0)  # fmt: skip
    torch.testing.assert_close(out.curvature, want, **EXACT)


class NeverOnInputIds(SharedEmbedding):
    def forward(self, input_ids, attention_mask=None, decoder_input_ids=None):
        e = self.embed(input_ids.flip(1))
        return self.decode(self.embed(decoder_input_ids), e, attention_mask.flip(1))


def test_shared_embedding_never_called_on_input_ids_is_refused():
    model = NeverOnInputIds().double().eval()
    input_ids = torch.tensor([[3, 4, 5], [6, 7, 8]])
    dec = torch.randint(1, VOCAB, (2, 4))
    scorer = TokenScorer(model, token_loss("masked"), n_probes=1, backend="torch")
    with pytest.raises(RuntimeError, match=r"called 2 time\(s\).*never on input_ids"):
        scorer.score(input_ids, dec, decoder_input_ids=dec)
