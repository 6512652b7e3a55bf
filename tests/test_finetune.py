"""`qwen2audio finetune` on the tiny checkpoint: the loss falls, the outputs load (the adapter with
load(adapter=), the merged folder in transformers and in `qwen2audio chat`), and a run interrupted after a
checkpoint (even while writing the next one) resumes to the same weights as an uninterrupted run."""

import json

import pytest
import torch
from helpers import audio_prompt_ids, load_hf, test_signal
from safetensors.torch import load_file

import qwen2audio
from qwen2audio.adapters import load_adapter
from qwen2audio.features import audio_token_count, extract_features
from qwen2audio.cli import main
from qwen2audio.finetune import finetune
from qwen2audio.finetune import state as checkpoint_state

pytestmark = pytest.mark.usefixtures("one_thread")


def inputs() -> dict[str, torch.Tensor]:
    """A prompt around one clip, built by hand (no tokenizer to load): ids, features and their mask."""
    features, mask = extract_features([test_signal(0.6, seed=5)])
    ids = audio_prompt_ids([audio_token_count(int(mask.sum()))], [[151644, 872, 198], [3838, 594, 30, 151645]])
    return dict(input_ids=torch.tensor([ids]), input_features=features, feature_attention_mask=mask)


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch)


def test_lora_run_learns_and_its_outputs_load(finetune_model, finetune_data, tmp_path, capsys):
    out = tmp_path / "out"
    status = main(["finetune", "--model", str(finetune_model), "--data", str(finetune_data), "--out", str(out),
                   "--max-steps", "24", "--batch-size", "2", "--grad-accum", "1", "--lr", "1e-2", "--merge",
                   "--eval", str(finetune_data), "--eval-every", "12"])
    assert status == 0
    err = capsys.readouterr().err
    assert "--lora-rank                8" in err and "--warmup-steps             0" in err  # the defaults, shown
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [r for r in log if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 25)) and all(r["lr"] > 0 for r in steps)
    assert [r["step"] for r in log if "eval_loss" in r] == [12, 24]  # every 12 steps, and at the end
    losses = [r["loss"] for r in steps]
    # The random tiny model's lm_head (std 0.02, width 64) keeps every logit near +-1.3, so LoRA on the decoder
    # alone cannot take the loss (log 151936 = 11.9) below ~10.6 (see test_learning.py): 0.5 is most of that room.
    assert sum(losses[-5:]) / 5 < losses[0] - 0.5, losses
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval_loss"] < losses[0] - 0.5 and summary["steps"] == 24
    assert json.loads((out / "training_args.json").read_text())["lora_rank"] == 8

    batch = inputs()
    unmerged = qwen2audio.load_model(finetune_model, quiet=True)
    base = logits(unmerged, batch)
    assert len(load_adapter(unmerged, out / "adapter")) == 2 * 7  # q k v o gate up down, 2 decoder layers
    adapted = logits(unmerged, batch)
    assert (adapted - base).abs().max() > 1e-2  # the adapter changed the model
    tuned = qwen2audio.load(finetune_model, adapter=out / "adapter", quiet=True, kernels="reference")
    assert (logits(tuned.model, batch) - adapted).abs().max() < 1e-5  # merged into the weights by load(adapter=)
    with torch.no_grad():
        assert (load_hf(out / "merged")(**batch).logits - adapted).abs().max() < 1e-4
    merged = qwen2audio.load(out / "merged", quiet=True, kernels="reference")  # what `chat --model` loads
    assert (logits(merged.model, batch) - adapted).abs().max() < 1e-4
    assert isinstance(merged.chat([{"role": "user", "content": "Hi"}], max_new_tokens=2), str)


def test_resume_after_a_checkpoint_ends_as_the_uninterrupted_run(finetune_model, finetune_data, tmp_path,
                                                                 monkeypatch):
    # Dropout on: the resumed run must also restore the random state to match.
    options = dict(model=str(finetune_model), data=str(finetune_data), max_steps=6, batch_size=2, grad_accum=1,
                   lr=1e-2, lora_dropout=0.1, save_every=2, quiet=True)
    whole = finetune(out=str(tmp_path / "whole"), **options)
    assert sorted(p.name for p in (tmp_path / "whole" / "checkpoints").iterdir()) == ["step-00000004"]

    real_write = checkpoint_state._write

    def killed_at_step_4(folder, name, *args, **kwargs):  # dies while writing the second checkpoint
        if folder.name.startswith(".step-00000004") and name == "optimizer.safetensors":
            (folder / name).write_bytes(b"half a file")
            raise KeyboardInterrupt
        return real_write(folder, name, *args, **kwargs)

    monkeypatch.setattr(checkpoint_state, "_write", killed_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        finetune(out=str(tmp_path / "cut"), **options)
    monkeypatch.undo()
    checkpoints = tmp_path / "cut" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == [".step-00000004.partial", "step-00000002"]
    resumed = finetune(out=str(tmp_path / "cut"), **{**options, "resume": str(tmp_path / "cut")})
    assert resumed["steps"] == 4 and abs(resumed["losses"][-1] - whole["losses"][-1]) < 1e-6
    ours, theirs = (load_file(tmp_path / run / "adapter" / "adapter_model.safetensors") for run in ("cut", "whole"))
    assert max((ours[k] - theirs[k]).abs().max().item() for k in ours) <= 1e-6
    log = [json.loads(line)["step"] for line in (tmp_path / "cut" / "log.jsonl").read_text().splitlines()]
    assert log == [1, 2, 3, 4, 5, 6]  # the log continues from the checkpoint, without the lost steps twice


def test_resume_refuses_another_run(finetune_model, finetune_data, tmp_path):
    options = dict(model=str(finetune_model), data=str(finetune_data), max_steps=2, batch_size=2, grad_accum=1,
                   save_every=1, quiet=True)
    finetune(out=str(tmp_path / "a"), **options)
    with pytest.raises(qwen2audio.InputError, match="another run.*lr: 0.0001 then, 0.001 now"):
        finetune(out=str(tmp_path / "b"), **{**options, "lr": 1e-3, "resume": str(tmp_path / "a")})
    with pytest.raises(qwen2audio.InputError, match="no checkpoint there"):
        finetune(out=str(tmp_path / "b"), **{**options, "resume": str(tmp_path)})


def test_full_fine_tuning_with_frozen_parts(finetune_model, finetune_data, tmp_path):
    summary = finetune(model=str(finetune_model), data=str(finetune_data), out=str(tmp_path / "out"), full=True,
                       freeze=("encoder", "projector"), max_steps=2, batch_size=2, grad_accum=1, lr=1e-3,
                       gradient_checkpointing=True, quiet=True)
    assert set(summary["outputs"]) == {"training_args", "log", "model"}
    base, tuned = load_file(finetune_model / "model.safetensors"), load_file(tmp_path / "out/model/model.safetensors")
    assert base.keys() == tuned.keys()
    for key in base:
        frozen = key.startswith(("audio_tower.", "multi_modal_projector."))
        assert torch.equal(base[key], tuned[key]) == frozen, key
    batch = inputs()
    ours = logits(qwen2audio.load_model(tmp_path / "out/model", quiet=True), batch)
    with torch.no_grad():
        assert (load_hf(tmp_path / "out/model")(**batch).logits - ours).abs().max() < 1e-4


def test_command_line_mistakes_are_one_line(capsys):
    assert main(["finetune", "--model", "m", "--out", "o"]) == 2
    assert "the following arguments are required: --data" in capsys.readouterr().err
    assert main(["finetune", "--model", "m", "--data", "d", "--out", "o", "--lora-rank", "x"]) == 2
    assert "--lora-rank: expected an integer, got 'x'" in capsys.readouterr().err
    assert main(["finetune", "--model", "m", "--data", "d", "--out", "o", "--lora-rank", "0"]) == 1
    assert "error: --lora-rank must be an integer >= 1, got 0" in capsys.readouterr().err


def test_accumulated_micro_batches_equal_one_batch(finetune_model, finetune_data, tmp_path):
    # The step's loss is the mean over all its answer tokens, however they fall into micro-batches (loop.py):
    # batch 1 x 2 accumulated equals batch 2 (the rows hold different numbers of answer tokens: 3 to 7).
    options = dict(model=str(finetune_model), data=str(finetune_data), max_steps=2, lr=1e-2, quiet=True)
    one = finetune(out=str(tmp_path / "one"), batch_size=2, grad_accum=1, **options)
    two = finetune(out=str(tmp_path / "two"), batch_size=1, grad_accum=2, **options)
    assert max(abs(a - b) for a, b in zip(one["losses"], two["losses"])) < 1e-5
    ours, theirs = (load_file(tmp_path / run / "adapter" / "adapter_model.safetensors") for run in ("one", "two"))
    assert max((ours[k] - theirs[k]).abs().max().item() for k in ours) < 1e-5
