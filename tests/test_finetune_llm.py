"""examples/finetune_llm.py at toy size: end to end, resume, the loss mask, accumulation,
and the fsdp x data mesh of 8 CPU devices (in one process, and in two) against one device.

The tiny model is pre-trained once per module (a few steps, a temporary cache folder);
the fine-tuning data are a few standard-library signature -> summary pairs.
"""

import contextlib
import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import load_example

pytest.importorskip("tokenizers")
pytest.importorskip("safetensors")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "finetune_llm.py"


@pytest.fixture(scope="module")
def example():
    return load_example("finetune_llm")


TINY = {"width": 32, "layers": 2, "vocab": 512, "corpus_bytes": 60_000, "steps": 3}


@pytest.fixture(scope="module")
def toy(example, tmp_path_factory):
    """The cache (tiny model pre-trained), data files, and the flags every run shares."""
    root = tmp_path_factory.mktemp("llm")
    cache = root / "cache"
    settings = example.TinySettings(**TINY)
    example.pretrained_tiny(settings, cache, progress=False)
    files = [p for p in example.stdlib_files() if p.parent.name == "asyncio"]
    pairs = example.signature_task(files)[:20]
    assert len(pairs) == 20, pairs
    example.write_jsonl(root / "train.jsonl", pairs[:-4])
    example.write_jsonl(root / "heldout.jsonl", pairs[-4:])
    flags = ["--cache", str(cache), "--quiet", "--dataset", str(root / "train.jsonl")]
    flags += ["--eval-dataset", str(root / "heldout.jsonl"), "--batch", "8", "--max-len", "64"]
    flags += ["--rank", "4", "--generations", "0", "--dtype", "float32"]
    flags += ["--pretrain-steps", "3", "--pretrain-width", "32", "--pretrain-layers", "2"]
    flags += ["--pretrain-bytes", "60000", "--vocab", "512"]
    return {"root": root, "flags": flags, "folder": example.pretrained_tiny(settings, cache)}


def _arrays(folder: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


STEPS = 3  # with checkpoints at steps 2 and 3


@pytest.fixture(scope="module")
def whole(example, toy):
    """One uninterrupted run of STEPS steps on one device, with generations and folders."""
    flags = [*toy["flags"], "--steps", str(STEPS), "--save-every", "2"]
    generate = ["--generations", "2", "--max-new-tokens", "4"]
    out = toy["root"] / "whole"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        results = example.main([*flags, *generate, "--out", str(out), "--merged"])
    results["printed"] = printed.getvalue()
    return results, out


def test_end_to_end_adapter_folder_and_exact_resume(example, toy, whole, capsys):
    import hf_llm

    results, out = whole
    assert "held-out loss after 3 DORA steps" in results["printed"]
    assert "greedy generations, after fine-tuning:" in results["printed"]
    assert len(results["generations_after"]) == 2
    before, after = results["before"][0], results["after"][0]
    assert np.isfinite(before) and np.isfinite(after) and after < before
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]
    flags = [*toy["flags"], "--steps", str(STEPS), "--save-every", "2"]

    # The PEFT folder loads into a fresh model with Hugging Face's names, and gives the
    # held-out loss the run reported; the merged folder is a plain model that gives it too.
    model, _ = hf_llm.load_pretrained(toy["folder"], dtype=jnp.float32)
    hf_llm.load_adapter(model, results["adapter"])
    merged, _ = hf_llm.load_pretrained(results["merged"], dtype=jnp.float32)
    tokenizer = example.load_tokenizer(toy["folder"])
    rows = example.read_jsonl(toy["root"] / "heldout.jsonl")
    test = example.encode(rows, tokenizer, 64, example.eos_id(toy["folder"], tokenizer))
    for loaded in (model, merged):
        graphdef, trainable, frozen = example.nnx.split(loaded, example.nnx.LoRAParam, ...)
        evaluate = example.make_evaluator(graphdef, test, 32)
        np.testing.assert_allclose(
            evaluate(example.nnx.to_pure_dict(trainable), frozen)[0], after, rtol=1e-5
        )

    # Interrupted after 2 steps, then resumed: the adapters of the uninterrupted run.
    split = toy["root"] / "split"
    stopped = example.main([*flags, "--out", str(split), "--stop-after", "2"])
    assert stopped["steps"] == 2 and "adapter" not in stopped
    with pytest.raises(SystemExit):  # a used folder needs --resume
        example.main([*flags, "--out", str(split)])
    resumed = example.main([*flags, "--out", str(split), "--resume"])
    assert "resuming from step 2" in capsys.readouterr().out
    assert resumed["steps"] == STEPS
    for (path, got), want in zip(
        jax.tree_util.tree_leaves_with_path(resumed["trainable"]),
        jax.tree.leaves(results["trainable"]),
        strict=True,
    ):
        np.testing.assert_array_equal(got, want, err_msg=jax.tree_util.keystr(path))


def test_loss_only_on_completion_tokens(example, toy):
    tokenizer = example.load_tokenizer(toy["folder"])
    eos = example.eos_id(toy["folder"], tokenizer)
    rows = [
        {"prompt": "Signature: def f(x)\nSummary:", "completion": " Return x."},
        {"prompt": "Signature: def g()\nSummary:", "completion": " Do nothing at all, twice."},
    ]
    batch = example.encode(rows, tokenizer, 40, eos)
    for i, row in enumerate(rows):
        prompt = tokenizer.encode(row["prompt"], add_special_tokens=False).ids
        completion = tokenizer.encode(row["completion"], add_special_tokens=False).ids + [eos]
        n = len(prompt) + len(completion) - 1
        np.testing.assert_array_equal(batch["tokens"][i, :n], (prompt + completion)[:-1])
        np.testing.assert_array_equal(batch["targets"][i, :n], (prompt + completion)[1:])
        # The targets that are completion tokens (and the closing EOS), nothing else.
        expected = np.zeros(40)
        expected[len(prompt) - 1 : n] = 1.0
        np.testing.assert_array_equal(batch["weights"][i], expected)
        np.testing.assert_array_equal(batch["attention_mask"][i], np.arange(40) < n)

    logits = np.random.default_rng(0).standard_normal((2, 40, tokenizer.get_vocab_size()))
    log_probs = logits - np.log(np.sum(np.exp(logits), -1, keepdims=True))  # float64
    per_row = []
    for i in range(2):
        picked = [
            -log_probs[i, t, batch["targets"][i, t]] for t in range(40) if batch["weights"][i, t]
        ]
        per_row.append(np.mean(picked))
    got = example.completion_loss(
        jnp.asarray(logits, jnp.float32), jax.tree.map(jnp.asarray, batch)
    )
    np.testing.assert_allclose(float(got), np.mean(per_row), rtol=1e-6)


def test_prompt_keeps_the_tokenizers_bos_when_cut(example, toy):
    """A Llama-style tokenizer.json puts BOS before the prompt (its post-processor): the
    prompt keeps it, also when cut from the left; the completion gets none."""
    from tokenizers import processors

    tokenizer = example.load_tokenizer(toy["folder"])
    tokenizer.add_special_tokens(["<s>"])
    bos = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", bos)]
    )
    eos = example.eos_id(toy["folder"], tokenizer)
    short = {"prompt": "Signature: def f(x)\nSummary:", "completion": " Return x."}
    long = {"prompt": "Signature: " + "word " * 80 + "\nSummary:", "completion": " Return x."}
    batch = example.encode([short, long], tokenizer, 40, eos)
    plain = tokenizer.encode(short["prompt"], add_special_tokens=False).ids
    completion = tokenizer.encode(short["completion"], add_special_tokens=False).ids + [eos]
    n = 1 + len(plain) + len(completion) - 1
    np.testing.assert_array_equal(batch["tokens"][0, :n], ([bos] + plain + completion)[:-1])
    assert batch["weights"][0].sum() == len(completion)
    # The long prompt: BOS, then the prompt's last 38 tokens, then the first completion
    # token and its target (the second).
    long_ids = tokenizer.encode(long["prompt"], add_special_tokens=False).ids
    np.testing.assert_array_equal(batch["tokens"][1], [bos] + long_ids[-38:] + completion[:1])
    np.testing.assert_array_equal(batch["targets"][1, -2:], completion[:2])
    np.testing.assert_array_equal(batch["weights"][1], np.arange(40) >= 38)


def test_end_ids_take_every_listed_eos(example, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": [128001, 128008, 128009]}))
    assert example.end_ids(tmp_path, 128001) == (128001, 128008, 128009)
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 2}))
    assert example.end_ids(tmp_path, 2) == (2,)
    (tmp_path / "config.json").write_text(json.dumps({}))
    assert example.end_ids(tmp_path, None) == ()


def _tiny_dora_problem(example, rows: int):
    from flax import nnx

    import dora_jax

    config = example.llama_config(
        {
            "vocab_size": 64,
            "hidden_size": 32,
            "intermediate_size": 48,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
        }
    )
    model = example.Llama(config, rngs=nnx.Rngs(0))
    dora_config = dora_jax.DoRAConfig(targets=example.TARGETS.split(","), rank=4)
    dora_jax.nnx.apply_dora(model, dora_config, rngs=nnx.Rngs(1))
    graphdef, trainable, frozen = nnx.split(model, nnx.LoRAParam, ...)
    # Nonzero B: the gradients of A are not trivially zero.
    trainable = jax.tree.map(lambda x: x + 0.05, nnx.to_pure_dict(trainable))
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 64, (rows, 16)).astype(np.int32)
    weights = np.zeros((rows, 16), np.float32)
    for i, start in enumerate(rng.integers(1, 14, rows)):  # completions of unequal lengths
        weights[i, start:] = 1.0
    batch = {
        "tokens": tokens,
        "targets": np.roll(tokens, -1, axis=1),
        "weights": weights,
        "attention_mask": np.ones((rows, 16), np.int32),
    }
    return graphdef, trainable, frozen, batch


def test_accumulated_micro_batches_equal_one_batch(example):
    from dora_jax import train

    graphdef, trainable, frozen, batch = _tiny_dora_problem(example, rows=8)
    forward = example.make_forward(graphdef)
    sgd = optax.sgd(1.0)  # the update is the gradient itself
    updated = {}
    for k in (1, 4):
        step = jax.jit(
            train.make_train_step(forward, example.completion_loss, sgd, accumulation_steps=k)
        )
        state, metrics = step(train.init_state(trainable, sgd), frozen, batch)
        updated[k] = (state.trainable, metrics["loss"])
    np.testing.assert_allclose(updated[4][1], updated[1][1], rtol=1e-6)
    for (path, got), want in zip(
        jax.tree_util.tree_leaves_with_path(updated[4][0]),
        jax.tree.leaves(updated[1][0]),
        strict=True,
    ):
        np.testing.assert_allclose(
            got, want, rtol=1e-6, atol=1e-6, err_msg=jax.tree_util.keystr(path)
        )


def test_fsdp_by_data_mesh_of_8_devices_equals_one_device(example, toy, whole):
    flags = [*toy["flags"], "--steps", str(STEPS), "--save-every", "2"]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    env.pop("XLA_FLAGS", None)
    eight = toy["root"] / "eight"
    command = [sys.executable, str(EXAMPLE), *flags, "--out", str(eight)]
    command += ["--cpu-devices", "8", "--fsdp", "4", "--data", "2", "--remat"]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "mesh fsdp 4 x data 2 (8 cpu device(s)" in run.stdout
    got, want = _arrays(eight / "adapter"), _arrays(whole[0]["adapter"])
    assert sorted(got) == sorted(want) and len(got) == 2 * 7 * 3  # 2 layers, 7 targets
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_two_processes_equal_one_device(example, toy, whole):
    """Two processes (4 CPU devices each) joined by ``jax.distributed`` on localhost,
    an fsdp 4 x data 2 mesh over both, stopped after step 2 and resumed from its
    checkpoint, generations on: the adapters of one uninterrupted device."""
    flags = [*toy["flags"], "--steps", str(STEPS), "--save-every", "2"]
    flags += ["--generations", "1", "--max-new-tokens", "2"]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    env.pop("XLA_FLAGS", None)
    out = toy["root"] / "two_processes"
    command = [sys.executable, str(EXAMPLE), *flags, "--out", str(out), "--cpu-devices", "4"]
    command += ["--fsdp", "4", "--data", "2", "--distributed", "--num-processes", "2"]
    printed = []
    for extra in (["--stop-after", "2"], ["--resume"]):
        with socket.socket() as s:
            s.bind(("localhost", 0))
            port = s.getsockname()[1]
        workers = [
            subprocess.Popen(
                [*command, *extra, "--coordinator", f"localhost:{port}", "--process-id", str(i)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for i in range(2)
        ]
        runs = [w.communicate(timeout=600) for w in workers]
        assert all(w.returncode == 0 for w in workers), [err[-3000:] for _, err in runs]
        printed.append(runs[0][0])
    assert "mesh fsdp 4 x data 2 (8 cpu device(s), 2 process(es))" in printed[0]
    assert "resuming from step 2" in printed[1]
    got, want = _arrays(out / "adapter"), _arrays(whole[0]["adapter"])
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_a_fresh_run_over_saved_checkpoints_is_refused(example, whole, capsys):
    _, out = whole  # holds the checkpoints of steps 2 and 3
    for argv, message in [
        (["--out", str(out)], "holds checkpoints of an earlier run (steps [2, 3])"),
        (["--resume"], "--out, --resume: resuming continues the run saved in a checkpoint"),
    ]:
        with pytest.raises(SystemExit):
            example.parse_args(argv)
        assert message in capsys.readouterr().err
    assert example.parse_args(["--out", str(out), "--resume"]).resume


def test_every_flag_has_help_and_bad_data_is_named(example, tmp_path):
    flags = [a for a in example.build_parser()._actions if a.dest != "help"]
    assert all(a.help for a in flags), [a.dest for a in flags if not a.help]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: expected"):
        example.read_jsonl(bad)
