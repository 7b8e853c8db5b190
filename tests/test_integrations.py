"""Lightning and Hugging Face callbacks, in short real training runs on the CPU.

The contract: the last tracked epoch equals scoring the final model directly with the same
settings, with ids that are the data set's indices whatever the training loop's order. Float64
models, so that 'equal' is tight: scoring in batches of another size changes only the rounding
of float64 matmuls, amplified by 1/h = 1e3 in a difference of gradients (about 1e-12).
"""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from curvkern import CurvatureScorer, CurvatureTracker
from curvkern.data import items_fingerprint
from curvkern.losses import sequence_cross_entropy
from curvkern.text import TokenScorer

EQUAL = {"rtol": 1e-9, "atol": 1e-12}
N_PROBES = 4


def _classification_data(n=48, features=6, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (n,), generator=g)
    return x, y


# -- Lightning ---------------------------------------------------------------------------------


def _lightning_module(features=6, classes=3):
    pl = pytest.importorskip("lightning.pytorch")

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(features, 16), nn.Tanh(), nn.Linear(16, classes))
            self.net.double()

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, _):
            x, y = batch
            return nn.functional.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.5)

    return pl, Module()


def _fit_lightning(pl, module, callback, x, y, epochs, **trainer_kwargs):
    trainer = pl.Trainer(
        max_epochs=epochs,
        **trainer_kwargs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
    )
    loader = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True)
    trainer.fit(module, loader)
    return trainer


def test_lightning_callback_last_epoch_equals_the_final_model(tmp_path):
    from curvkern.integrations.lightning import CurvatureCallback

    torch.manual_seed(0)
    x, y = _classification_data()
    pl, module = _lightning_module()
    path = tmp_path / "curvature.npz"
    callback = CurvatureCallback(TensorDataset(x, y), batch_size=20, path=path, n_probes=N_PROBES)
    _fit_lightning(pl, module, callback, x, y, epochs=3)

    assert callback.tracker.epochs == [0, 1, 2]
    assert module.training  # the scorer left the module as Lightning had it
    direct = CurvatureScorer(module, n_probes=N_PROBES).score(x, y, torch.arange(len(x)))
    torch.testing.assert_close(callback.tracker.history[-1], direct.curvature, **EQUAL)
    # Training moved the model between epochs, so the epochs differ.
    assert not torch.allclose(callback.tracker.history[0], callback.tracker.history[-1])
    # The file holds what the callback tracked.
    saved = CurvatureTracker.load(path)
    assert saved.epochs == [0, 1, 2]
    torch.testing.assert_close(saved.mean, callback.tracker.mean.to(saved.mean.dtype))


def test_lightning_callback_refuses_to_resume_a_file_of_other_data(tmp_path):
    from curvkern.integrations.lightning import CurvatureCallback

    torch.manual_seed(0)
    x, y = _classification_data()
    pl, module = _lightning_module()
    path = tmp_path / "curvature.npz"
    callback = CurvatureCallback(TensorDataset(x, y), batch_size=20, path=path, n_probes=N_PROBES)
    _fit_lightning(pl, module, callback, x, y, epochs=1)
    # The same data again resumes; other data of the same N is refused, naming what differs.
    again = CurvatureCallback(TensorDataset(x, y), batch_size=20, path=path, n_probes=N_PROBES)
    _fit_lightning(pl, module, again, x, y, epochs=2)
    assert again.tracker.epochs == [0, 1]
    other = CurvatureCallback(
        TensorDataset(x.flip(0), y.flip(0)), batch_size=20, path=path, n_probes=N_PROBES
    )
    with pytest.raises(ValueError, match=r"x \(a fixed sample of its rows\)"):
        _fit_lightning(pl, module, other, x, y, epochs=1)


def test_items_fingerprint_ignores_random_augmentation():
    class Augmented(torch.utils.data.Dataset):
        def __len__(self):
            return 10

        def __getitem__(self, i):
            return torch.rand(3), i % 2

    stable = TensorDataset(torch.arange(30.0).reshape(10, 3), torch.arange(10) % 2)
    assert items_fingerprint(stable)["x_sha256"] is not None
    assert items_fingerprint(stable) == items_fingerprint(stable)
    random = items_fingerprint(Augmented())
    assert random["num_samples"] == 10 and random["x_sha256"] is None


def test_lightning_callback_scores_the_float32_module_in_bf16_mixed_training():
    from curvkern.integrations.lightning import CurvatureCallback

    torch.manual_seed(0)
    x, y = _classification_data()
    x = x.float()
    pl, module = _lightning_module()
    module.float()
    callback = CurvatureCallback(TensorDataset(x, y), batch_size=48, n_probes=N_PROBES)
    trainer = _fit_lightning(pl, module, callback, x, y, epochs=2, precision="bf16-mixed")
    assert trainer.precision == "bf16-mixed"
    # Lightning trains under autocast and calls the epoch-end hooks outside it, so the tracked
    # epoch is the float32 module's: the same numbers as scoring it directly, batch for batch.
    direct = CurvatureScorer(module, n_probes=N_PROBES).score(x, y, torch.arange(len(x)))
    torch.testing.assert_close(callback.tracker.history[-1], direct.curvature, rtol=0, atol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(x)
    assert out.dtype == torch.bfloat16  # what scoring inside training's autocast would see


def test_lightning_callback_on_a_random_split_part_ranks_its_own_ids(recwarn):
    from torch.utils.data import random_split

    from curvkern.integrations.lightning import CurvatureCallback

    torch.manual_seed(2)
    x, y = _classification_data()
    pl, module = _lightning_module()
    part, _ = random_split(TensorDataset(x, y), [16, 32], torch.Generator().manual_seed(0))
    callback = CurvatureCallback(part, batch_size=8, n_probes=2)
    _fit_lightning(pl, module, callback, x, y, epochs=3)
    # ids are the full data set's indices: 32 of the 48 rows are never scored, said once
    unscored = [w for w in recwarn if "without a curvature" in str(w.message)]
    assert len(unscored) == 1 and "left 32 of 48 ids" in str(unscored[0].message)
    top = callback.tracker.top(10).indices
    assert set(top.tolist()) <= set(part.indices)
    assert torch.isnan(callback.tracker.mean[callback.tracker.mean.topk(10).indices]).all()


def test_lightning_callback_every_n_epochs_and_no_history():
    from curvkern.integrations.lightning import CurvatureCallback

    torch.manual_seed(1)
    x, y = _classification_data()
    pl, module = _lightning_module()
    callback = CurvatureCallback(
        TensorDataset(x, y), batch_size=48, every_n_epochs=2, keep_history=False, n_probes=2
    )
    _fit_lightning(pl, module, callback, x, y, epochs=4)
    assert callback.tracker.epochs == [1, 3]
    with pytest.raises(RuntimeError, match="keep_history"):
        callback.tracker.history  # noqa: B018


def test_lightning_callback_rejects_bad_arguments():
    from curvkern.integrations.lightning import CurvatureCallback

    data = TensorDataset(*_classification_data())
    with pytest.raises(ValueError, match="every_n_epochs"):
        CurvatureCallback(data, every_n_epochs=0)
    with pytest.raises(ValueError, match="batch_size"):
        CurvatureCallback(data, batch_size=0)


# -- Hugging Face ------------------------------------------------------------------------------


def _trainer(model, train_set, callback, output_dir, epochs=2, **training_args):
    transformers = pytest.importorskip("transformers")

    def collate(items):
        # The training side pads on its own; the callback scores with its own loader.
        length = max(len(i["input_ids"]) for i in items)
        ids = torch.zeros(len(items), length, dtype=torch.long)
        mask = torch.zeros(len(items), length, dtype=torch.long)
        for b, item in enumerate(items):
            ids[b, : len(item["input_ids"])] = torch.as_tensor(item["input_ids"])
            mask[b, : len(item["input_ids"])] = 1
        labels = torch.as_tensor([i["labels"] for i in items])
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    args = transformers.TrainingArguments(
        output_dir=str(output_dir),
        num_train_epochs=epochs,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        seed=0,
        **training_args,
    )
    return transformers.Trainer(
        model=model,
        args=args,
        train_dataset=train_set,
        data_collator=collate,
        callbacks=[callback],
    )


def _bert(num_labels=2):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=40,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        num_labels=num_labels,
        hidden_dropout_prob=0.1,  # dropout in training; scoring runs in eval mode
        attention_probs_dropout_prob=0.1,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config).double()


def _token_items(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    items = []
    for i in range(n):
        length = 4 + i % 5  # sequences of different lengths: the callback pads them
        items.append(
            {
                "input_ids": torch.randint(1, 40, (length,), generator=g).tolist(),
                "labels": i % 2,
            }
        )
    return items


def test_huggingface_callback_last_epoch_equals_the_final_model(tmp_path):
    from curvkern.integrations.huggingface import CurvatureCallback, collate

    items = _token_items()
    model = _bert()
    callback = CurvatureCallback(items, batch_size=5, n_probes=N_PROBES)
    _trainer(model, items, callback, tmp_path).train()

    assert callback.tracker.epochs == [0, 1]
    assert model.training  # left in train mode, as the Trainer had it
    x, y, ids, inputs = collate([(item, 0, i) for i, item in enumerate(items)])
    direct = TokenScorer(model, n_probes=N_PROBES).score(x, y, ids, **inputs)
    torch.testing.assert_close(callback.tracker.history[-1], direct.curvature, **EQUAL)
    assert torch.isfinite(callback.tracker.baselines()["aum"]).all()


def test_huggingface_callback_scores_the_float32_model_in_bf16_training(tmp_path):
    from curvkern.integrations.huggingface import CurvatureCallback, collate

    items = _token_items()
    model = _bert().float()
    callback = CurvatureCallback(items, batch_size=12, n_probes=N_PROBES)
    _trainer(model, items, callback, tmp_path, bf16=True).train()
    # accelerate trained through an autocast wrapper of model.forward, and left it in place
    assert model.__dict__["forward"] is not model.__dict__["_original_forward"]
    with torch.no_grad():
        x, y, ids, inputs = collate([(item, 0, i) for i, item in enumerate(items)])
        assert model(x, **inputs).logits.dtype == torch.float32  # converted back to float32
    # The same weights in a plain float32 model: the tracked epoch is its curvature, batch for
    # batch the same computation (through the wrapper it was 7% off for a BERT, median).
    plain = type(model)(model.config)
    plain.load_state_dict(model.state_dict())
    direct = TokenScorer(plain, n_probes=N_PROBES).score(x, y, ids, **inputs)
    torch.testing.assert_close(callback.tracker.history[-1], direct.curvature, rtol=0, atol=0)
    assert callback.tracker.epochs == [0, 1]


def test_huggingface_callback_causal_lm_needs_a_sequence_loss(tmp_path):
    transformers = pytest.importorskip("transformers")
    from curvkern.integrations.huggingface import CurvatureCallback, collate

    config = transformers.GPT2Config(
        vocab_size=40, n_positions=16, n_embd=16, n_layer=1, n_head=2, pad_token_id=0
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).double()
    items = [{"input_ids": t, "labels": t} for t in (i["input_ids"] for i in _token_items(n=6))]
    callback = CurvatureCallback(items, batch_size=6, n_probes=2)
    with pytest.raises(ValueError, match="sequence_cross_entropy"):
        callback._scoring.score(lambda: callback._make_scorer(model), 0)

    # With the sequence loss: padded label positions are -100, so they do not count.
    callback = CurvatureCallback(items, batch_size=4, n_probes=2, loss_fn=sequence_cross_entropy)
    callback.on_epoch_end(None, transformers.TrainerState(epoch=1.0), None, model=model)
    x, y, ids, inputs = collate([(item, 0, i) for i, item in enumerate(items)])
    assert (y[inputs["attention_mask"] == 0] == -100).all()
    direct = TokenScorer(model, sequence_cross_entropy, n_probes=2).score(x, y, ids, **inputs)
    torch.testing.assert_close(callback.tracker.history[-1], direct.curvature, **EQUAL)


def test_huggingface_callback_image_items(tmp_path):
    transformers = pytest.importorskip("transformers")
    from curvkern.integrations.huggingface import CurvatureCallback

    config = transformers.ViTConfig(
        image_size=8,
        patch_size=4,
        num_channels=1,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=3,
    )
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(config).double()
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(6, 1, 8, 8, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    items = [{"pixel_values": p, "label": int(c)} for p, c in zip(pixels, labels, strict=True)]
    callback = CurvatureCallback(items, batch_size=4, n_probes=2)
    callback.on_epoch_end(None, transformers.TrainerState(epoch=1.0), None, model=model)
    direct = CurvatureScorer(model, input_key="pixel_values", n_probes=2).score(
        pixels, labels, torch.arange(6)
    )
    torch.testing.assert_close(callback.tracker.history[-1], direct.curvature, **EQUAL)


def _seq2seq(kind):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if kind == "t5":
        config = transformers.T5Config(
            vocab_size=40, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
            decoder_start_token_id=0, pad_token_id=0, dropout_rate=0.0,
        )  # fmt: skip
        return transformers.T5ForConditionalGeneration(config).double()
    config = transformers.BartConfig(
        vocab_size=40, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
        max_position_embeddings=32, pad_token_id=1, bos_token_id=0, eos_token_id=2,
        decoder_start_token_id=2, dropout=0.0,
    )  # fmt: skip
    return transformers.BartForConditionalGeneration(config).double()


@pytest.mark.parametrize("kind", ["t5", "bart"])
def test_huggingface_callback_scores_encoder_decoder_models(kind):
    transformers = pytest.importorskip("transformers")
    from curvkern.integrations.huggingface import CurvatureCallback

    model = _seq2seq(kind)
    # targets of their own lengths (not the inputs'), padded with -100 by the callback
    items = [
        {"input_ids": i["input_ids"], "labels": i["input_ids"][: 2 + n % 3][::-1]}
        for n, i in enumerate(_token_items(n=6))
    ]
    callback = CurvatureCallback(items, batch_size=4, n_probes=2)
    callback.on_epoch_end(None, transformers.TrainerState(epoch=1.0), None, model=model)
    tracked = callback.tracker.history[-1]
    assert torch.isfinite(tracked).all() and (tracked > 0).all()
    # The loss the callback scored is the model's own teacher-forced loss, item by item.
    model.eval()
    with torch.no_grad():
        own = [
            model(
                input_ids=torch.tensor([i["input_ids"]]), labels=torch.tensor([i["labels"]])
            ).loss.item()
            for i in items
        ]
    torch.testing.assert_close(
        callback.tracker.field_history("loss")[-1], torch.tensor(own, dtype=torch.float64)
    )
    # sequence_cross_entropy's causal shift would compare each logit with the next label
    shifted = CurvatureCallback(items, batch_size=4, n_probes=2, loss_fn=sequence_cross_entropy)
    with pytest.raises(ValueError, match="encoder-decoder model.*shift=False"):
        shifted.on_epoch_end(None, transformers.TrainerState(epoch=1.0), None, model=model)


def test_huggingface_callback_refuses_unclear_items_with_one_sentence():
    transformers = pytest.importorskip("transformers")
    from curvkern.integrations.huggingface import CurvatureCallback

    def epoch_end(items, model, **kwargs):
        callback = CurvatureCallback(items, batch_size=4, n_probes=2, **kwargs)
        callback.on_epoch_end(None, transformers.TrainerState(epoch=1.0), None, model=model)

    items, bert = _token_items(n=4), _bert()
    with pytest.raises(TypeError, match=r"column 'text' holds str values.*remove_columns"):
        epoch_end([dict(i, text="a review") for i in items], bert)
    # a class label stored as a list of one
    with pytest.raises(ValueError, match=r"labels of shape \(1,\) but 4 input_ids.*not \[3\]"):
        epoch_end([dict(i, labels=[i["labels"]]) for i in items], bert)
    with pytest.raises(ValueError, match=r"labels of shape \(1,\) but 4 input_ids"):
        epoch_end([dict(i, labels=[i["labels"]]) for i in items], bert, loss_fn=lambda o, y: y)
    config = transformers.ViTConfig(
        image_size=8, patch_size=4, num_channels=1, hidden_size=16, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=32, num_labels=3,
    )  # fmt: skip
    vit = transformers.ViTForImageClassification(config).double()
    pixels = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"labels of shape \(1,\).*label=3, not \[3\]"):
        epoch_end([{"pixel_values": p, "labels": [1]} for p in pixels], vit)
    with pytest.raises(ValueError, match="encoder-decoder model.*needs input_ids"):
        epoch_end([{"pixel_values": p, "labels": [1]} for p in pixels], _seq2seq("t5"))


def test_huggingface_callback_rejects_items_it_cannot_score():
    pytest.importorskip("transformers")
    from curvkern.integrations.huggingface import collate

    with pytest.raises(KeyError, match="input_ids"):
        collate([({"text": "a", "labels": 0}, 0, 0)])
    with pytest.raises(TypeError, match="dict items"):
        collate([((torch.zeros(2), 0), 0, 0)])
