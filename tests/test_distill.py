"""distill-1x and fit-compensation (docs/distill-1x.md) on the shipped toy teacher, at a few steps: distillation lowers
the student's error to its teacher on noise it never saw, the student exports and the engine runs its 1.x program as
PyTorch does, a run killed with -9 resumes to the same student, fitted compensation lowers the skipping program's error
against the full student on held-out prompts; and every refusal comes before any work."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import slimengine as se
from slimengine.distill.cli import distill_main, fit_main
from slimengine.distill.data import encode_prompts, load_encoder_pipeline, noise
from slimengine.distill.student import make_student, run_program, skip_error
from slimengine.export.checkpoint import load_checkpoint
from slimengine.export.sampling_plan import make_plan
from slimengine.tools import toy_shapes

from .conftest import TOY_CHECKPOINT, TOY_PIPELINE, TOY_PROMPTS, TOY_TEACHER, export

# A small run: 12 prompts x 16 noises, a 4-step teacher, 40 optimiser steps of 8 pairs. Measured (seeds 0 and 5): the
# error to the teacher on the training pairs falls to about 0.6x, on prompts and noise never seen to 0.81-0.83x; with 4
# noises a prompt the student learns its 48 pairs and little else (held out: 0.95x at 80 steps).
SMALL = ["--samples-per-prompt", "16", "--teacher-steps", "4", "--guidance", "4", "--train-steps", "40", "--batch-size", "8",
         "--lr", "5e-4", "--skip-blocks", "1-3", "--threads", "2", "--seed", "5", "-q"]
HELD_OUT = toy_shapes.class_prompts()  # template 0: never in the prompt files below


def prompt_file(path, prompts):
    path.write_text("".join(p + "\n" for p in prompts))
    return path


@pytest.fixture(scope="module")
def few_prompts(tmp_path_factory):
    lines = [line for line in TOY_PROMPTS.read_text().splitlines() if line and not line.startswith("#")]
    return prompt_file(tmp_path_factory.mktemp("prompts") / "prompts.txt", lines[::14])  # 12 prompts, every class and template


@pytest.fixture(scope="module")
def distilled(tmp_path_factory, few_prompts):
    out = tmp_path_factory.mktemp("distill") / "student.safetensors"
    assert distill_main([str(TOY_TEACHER), "--pipeline", str(TOY_PIPELINE), "--prompts", str(few_prompts), "-o", str(out), *SMALL]) == 0
    return out


@pytest.fixture(scope="module")
def held_out_conditioning():
    pipe = load_encoder_pipeline(TOY_PIPELINE)
    return encode_prompts(pipe, HELD_OUT, 10), encode_prompts(pipe, [""], 10)


def test_distillation_lowers_the_students_error_to_the_teacher(distilled, few_prompts, held_out_conditioning):
    """The loss distill-1x reports falls, and so does the error PyTorch measures here, against the teacher's samples
    computed here (not the tool's): on the training pairs, and on prompts and noise it never saw."""
    student = load_checkpoint(distilled)
    record = student.metadata["distill"]
    assert record["final_loss"] < 0.8 * record["first_loss"] and record["train_steps"] == 40
    assert student.metadata["sampling"]["skip_blocks"] == "1-3" and student.has_compensation
    teacher = load_checkpoint(TOY_TEACHER).build_model()
    pipe = load_encoder_pipeline(TOY_PIPELINE)
    prompts = [line for line in few_prompts.read_text().splitlines()]
    train_text, train_pooled = encode_prompts(pipe, prompts, 10)
    (held_text, held_pooled), (neg_text, neg_pooled) = held_out_conditioning
    teacher_plan, plan = make_plan(6, False, steps=4, guidance_scale=4.0), make_plan(6, True, student.metadata)
    index = torch.arange(len(prompts)).repeat(16)  # distill-1x's pairs: prompt i with noise i, i + 12, ...
    cases = {"training pairs": (noise(len(index), (16, 16, 16), 5), train_text[index], train_pooled[index]),
             "held out": (noise(len(HELD_OUT), (16, 16, 16), 123), held_text, held_pooled)}
    for name, (x, text, pooled) in cases.items():
        with torch.no_grad():
            target = run_program(teacher, teacher_plan, x, text, pooled, neg_text.expand(len(x), -1, -1), neg_pooled.expand(len(x), -1))[-1]
            # before: the teacher's weights in the student's program, compensation at init (Δ reused as is)
            before = torch.nn.functional.mse_loss(run_program(make_student(teacher), plan, x, text, pooled)[-1], target).item()
            after = torch.nn.functional.mse_loss(run_program(student.build_model(), plan, x, text, pooled)[-1], target).item()
        print(f"{name}: MSE to the teacher {before:.4f} -> {after:.4f}")
        assert after < (0.8 if name == "training pairs" else 0.95) * before, (name, before, after)


def test_the_student_exports_and_the_engine_runs_its_1x_program_as_pytorch_does(distilled, tmp_path, held_out_conditioning):
    (text, pooled), _ = held_out_conditioning
    bundle = export(distilled, tmp_path / "student.engine")
    program = json.loads((bundle / "manifest.json").read_text())["program"]
    assert program["skip_blocks"] == [1, 3] and program["compensation"] == "mlp" and len(program["steps"]) == 2
    ck = load_checkpoint(distilled)
    x = noise(len(HELD_OUT), (16, 16, 16), 9)
    with se.open_engine(bundle) as engine:
        got = engine.session().generate(text.numpy(), pooled.numpy(), latents=x.numpy()).latents
    with torch.no_grad():
        want = run_program(ck.build_model(), make_plan(6, True, ck.metadata), x, text, pooled)[-1].numpy()
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-4


def test_the_students_own_shift_places_its_middle_step_and_travels_to_the_bundle(few_prompts, tmp_path, capsys):
    """--shift 2: the student's sigmas are 1 -> 2/3 -> 0 (snapped to the teacher's shift-3 grid), in its metadata, in the
    exported program, and in what fit-compensation then reads."""
    out = tmp_path / "student.safetensors"
    i = SMALL.index("--train-steps")
    args = SMALL[:i] + ["--train-steps", "2"] + SMALL[i + 2:]
    assert distill_main([str(TOY_TEACHER), "--pipeline", str(TOY_PIPELINE), "--prompts", str(few_prompts), "-o", str(out), *args,
                         "--shift", "2"]) == 0
    assert capsys.readouterr().err == ""  # -q: the teacher's export printed its lines (break-it)
    sampling = load_checkpoint(out).metadata["sampling"]
    assert (sampling["shift"], sampling["teacher_shift"]) == (2.0, 3.0)
    want = make_plan(6, True, steps=2, shift=2.0, teacher_shift=3.0, skip_blocks="1-3").sigmas
    assert abs(want[1] - 2 / 3) < 1e-3 and want != make_plan(6, True, steps=2, shift=3.0, teacher_shift=3.0, skip_blocks="1-3").sigmas
    steps = json.loads((export(out, tmp_path / "student.engine") / "manifest.json").read_text())["program"]["steps"]
    assert [s["sigma"] for s in steps] == pytest.approx(want[:2]) and steps[-1]["sigma_next"] == 0
    fitted = tmp_path / "fitted.safetensors"
    assert fit_main([str(out), "--pipeline", str(TOY_PIPELINE), "--prompts", str(few_prompts), "-o", str(fitted), "--skip-blocks", "1-4",
                     "--steps", "2", "--samples-per-prompt", "1", "-q"]) == 0
    assert load_checkpoint(fitted).metadata["sampling"] == {**sampling, "skip_blocks": "1-4"}


DISTILL_SCRIPT = "import sys; from slimengine.distill.cli import distill_main; sys.exit(distill_main(sys.argv[1:]))"


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory, few_prompts):
    """The resume file of a run of SMALL killed with -9 after its first periodic save (step 5)."""
    tmp_path = tmp_path_factory.mktemp("killed")
    return kill_after_two_saves(tmp_path / "student.safetensors", few_prompts)[1]


def kill_after_two_saves(out, few_prompts):
    resume = out.with_name(out.name + ".resume")
    args = [str(TOY_TEACHER), "--pipeline", str(TOY_PIPELINE), "--prompts", str(few_prompts), "-o", str(out), *SMALL, "--save-every", "5"]
    proc = subprocess.Popen([sys.executable, "-c", DISTILL_SCRIPT, *args], stderr=subprocess.PIPE)
    deadline, writes, seen = time.monotonic() + 300, 0, None
    while writes < 2 and proc.poll() is None and time.monotonic() < deadline:  # the first write is before step 0
        stamp = resume.stat().st_mtime_ns if resume.exists() else None
        if stamp is not None and stamp != seen:
            writes, seen = writes + 1, stamp
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert writes == 2 and proc.returncode == -signal.SIGKILL and not out.exists()
    assert 0 < torch.load(resume, weights_only=True)["step"] < 40
    return args, resume


def test_a_run_killed_with_sigkill_resumes_to_the_same_student(distilled, few_prompts, tmp_path):
    out = tmp_path / "student.safetensors"
    args, resume = kill_after_two_saves(out, few_prompts)
    assert distill_main(args) == 2  # the resume file is not overwritten silently
    assert distill_main([*args, "--resume"]) == 0 and not resume.exists()
    want, got = load_checkpoint(distilled).state_dict, load_checkpoint(out).state_dict
    assert want.keys() == got.keys() and all(torch.allclose(want[k].float(), got[k].float(), atol=1e-6) for k in want)


def test_fitted_compensation_lowers_the_skip_error_on_held_out_prompts(few_prompts, tmp_path, held_out_conditioning):
    (text, pooled), _ = held_out_conditioning
    out = tmp_path / "blocks-1-4.safetensors"
    assert fit_main([str(TOY_CHECKPOINT), "--pipeline", str(TOY_PIPELINE), "--prompts", str(few_prompts), "--skip-blocks", "1-4",
                     "--samples-per-prompt", "2", "--steps", "150", "--threads", "2", "-o", str(out), "-q"]) == 0
    fitted = load_checkpoint(out)
    assert fitted.metadata["sampling"]["skip_blocks"] == "1-4" and "distill" in fitted.metadata
    plan = make_plan(6, True, fitted.metadata)
    x = noise(len(HELD_OUT), (16, 16, 16), 77)
    model = fitted.build_model()
    import dataclasses

    identity = skip_error(model, dataclasses.replace(plan, compensation="identity"), x, text, pooled)
    mlp = skip_error(model, plan, x, text, pooled)
    shipped = skip_error(load_checkpoint(TOY_CHECKPOINT).build_model(), plan, x, text, pooled)  # its MLP: distilled for 1-3
    print(f"held-out relative error of blocks 1-4 vs the full student: Δ as is {identity:.4f}, shipped 1-3 MLP "
          f"{shipped:.4f}, fitted {mlp:.4f}")
    # measured: 0.458 as is, 0.433 with the 1-3 MLP, 0.342 fitted (0.75x)
    assert mlp < 0.9 * identity and mlp < 0.95 * shipped
    # only the compensation changed
    source = load_checkpoint(TOY_CHECKPOINT).state_dict
    assert all(torch.equal(v, source[k]) for k, v in fitted.state_dict.items() if not k.startswith("delta_pred_"))
    assert any(not torch.equal(v, source[k]) for k, v in fitted.state_dict.items() if k.startswith("delta_pred_"))


# (what is wrong: the changed arguments, a part of the one-line error)
REFUSALS = [
    ({"blocks": "1-5"}, "must lie within 0-4 for a 6-block model"),
    ({"blocks": "7-9"}, "must lie within 0-4 for a 6-block model"),
    ({"blocks": "three"}, "not of the form A-B"),
    ({"blocks": None}, "skip-blocks"),  # the teacher names no range (distill-1x), fit-compensation always needs one
    ({"prompts": "empty.txt"}, "no prompts"),
    ({"prompts": "missing.txt"}, "cannot read the prompt file"),
    ({"pipeline": "folder"}, "not a diffusers pipeline folder"),
    ({"source": "notes.txt"}, "notes.txt"),
    ({"output": "student.pt"}, "must be a .safetensors file"),
    ({"extra": ["--samples-per-prompt", "0"]}, "--samples-per-prompt must be at least 1"),
    ({"extra": ["--device", "tpu"]}, "--device must be cpu or cuda"),
    # found by the break-it pass: a FIFO hung, /dev/zero filled the memory, a huge count allocated before failing
    ({"prompts": "fifo"}, "must be a regular file"),
    ({"prompts": "/dev/zero"}, "must be a regular file"),
    ({"source": "fifo"}, "must be a regular file"),
    ({"extra": ["--samples-per-prompt", "1000000000"]}, "more than half of this machine's"),
    ({"extra": ["--threads", "99999999999"]}, "--threads must be from 1 to 1024"),
]


@pytest.mark.parametrize("main", [distill_main, fit_main], ids=["distill-1x", "fit-compensation"])
@pytest.mark.parametrize("change,message", REFUSALS, ids=[m for _, m in REFUSALS])
def test_bad_input_is_refused_before_any_work_with_one_line(main, change, message, tmp_path, few_prompts, capsys):
    prompt_file(tmp_path / "empty.txt", ["", "# only a comment", "   "])
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    (tmp_path / "folder").mkdir()
    os.mkfifo(tmp_path / "fifo")
    given = {"source": str(TOY_TEACHER), "pipeline": str(TOY_PIPELINE), "prompts": str(few_prompts), "output": "student.safetensors",
             "blocks": "1-3", "extra": []}
    given.update(change)
    path = lambda name: str(tmp_path / name) if not os.path.isabs(name) else name  # noqa: E731
    argv = [path(given["source"]), "--pipeline", path(given["pipeline"]), "--prompts", path(given["prompts"]),
            "-o", path(given["output"]), *given["extra"], "-q"] + (["--skip-blocks", given["blocks"]] if given["blocks"] else [])
    start = time.perf_counter()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.txt", "fifo", "folder", "notes.txt"] and time.perf_counter() - start < 30


def teacher_with_sampling(tmp_path, sampling) -> str:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(TOY_TEACHER), "pt") as f:
        metadata = json.loads(f.metadata()["slimengine"])
    out = tmp_path / "teacher.safetensors"
    save_file(load_file(str(TOY_TEACHER)), str(out), metadata={"slimengine": json.dumps({**metadata, "sampling": sampling})})
    return str(out)


# distill-1x's own numbers and the teacher's sampling metadata (each went on to a traceback after minutes of work)
DISTILL_REFUSALS = [
    ([], {"guidance_scale": float("inf")}, "guidance_scale (or pass --guidance) must be a number from 1 to 100"),
    (["--guidance", "inf"], None, "--guidance must be a number from 1 to 100"),
    ([], {"shift": 1e308}, "the shift (metadata sampling.shift) must be a number from 0.001 to 1000"),
    ([], {"shift": 0}, "the shift (metadata sampling.shift) must be a number from 0.001 to 1000"),
    ([], "x", "the metadata's sampling must be an object, got str"),
    (["--teacher-steps", "1000000000"], None, "--teacher-steps must be from 1 to 10000"),
    (["--batch-size", "1000000000"], None, "--batch-size 1000000000 is more than the 192 pairs"),
    (["--shift", "0"], None, "--shift must be a number from 0.001 to 1000"),
    # break-it: 1e-3 was accepted and trained a student whose middle sigma snaps to 0 (its second step did nothing)
    (["--shift", "0.001"], None, "puts its middle step at sigma 0 on the teacher's grid"),
]


@pytest.mark.parametrize("flags,sampling,message", DISTILL_REFUSALS, ids=[m for *_, m in DISTILL_REFUSALS])
def test_distill_numbers_and_teacher_metadata_are_checked_before_any_work(flags, sampling, message, tmp_path, few_prompts, capsys):
    teacher = str(TOY_TEACHER) if sampling is None else teacher_with_sampling(tmp_path, sampling)
    out = tmp_path / "student.safetensors"
    g = SMALL.index("--guidance")
    small = SMALL[:g] + SMALL[g + 2:]  # the teacher's metadata gives the guidance
    args = [teacher, "--pipeline", str(TOY_PIPELINE), "--prompts", str(few_prompts), "-o", str(out), *small, *flags]
    start = time.perf_counter()
    assert distill_main(args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not out.exists() and not list(tmp_path.glob("*.resume")) and not list(tmp_path.glob(".*lock"))
    assert time.perf_counter() - start < 30


@pytest.mark.parametrize("make,message", [
    (lambda p: p.mkdir(), "it is a directory"),
    (lambda p: os.mkfifo(p), "it is a FIFO"),
], ids=["directory", "FIFO"])
def test_a_resume_path_that_is_not_a_file_is_named_for_what_it_is(make, message, few_prompts, tmp_path, capsys):
    """A directory at OUT.resume was reported as "exists (an interrupted run)" or, with --resume, as missing."""
    out = tmp_path / "student.safetensors"
    make(tmp_path / "student.safetensors.resume")
    args = [str(TOY_TEACHER), "--pipeline", str(TOY_PIPELINE), "--prompts", str(few_prompts), "-o", str(out), *SMALL]
    for extra in ([], ["--resume"]):
        assert distill_main([*args, *extra]) == 2
        err = capsys.readouterr().err
        assert f"student.safetensors.resume: {message}" in err and err.count("\n") == 1, err


def test_an_output_name_too_long_for_its_resume_file_is_refused_at_once(few_prompts, tmp_path, capsys):
    """A 250-byte output name fits, its .resume does not: a raw "[Errno 36]" came after the pipeline had loaded."""
    out = tmp_path / ("s" * 238 + ".safetensors")
    start = time.perf_counter()
    assert distill_main([str(TOY_TEACHER), "--pipeline", str(TOY_PIPELINE), "--prompts", str(few_prompts), "-o", str(out), *SMALL]) == 2
    err = capsys.readouterr().err
    assert "its name is longer than 255 bytes" in err and err.count("\n") == 1 and time.perf_counter() - start < 5, err


def test_a_second_run_to_the_same_output_is_refused_while_the_first_runs(few_prompts, tmp_path, capsys):
    from slimengine.distill.cli import _lock, _unlock

    out = tmp_path / "student.safetensors"
    held = _lock(out)  # what a running distill-1x holds
    try:
        assert distill_main([str(TOY_TEACHER), "--pipeline", str(TOY_PIPELINE), "--prompts", str(few_prompts), "-o", str(out), *SMALL]) == 2
        assert "another distill-1x is writing" in capsys.readouterr().err and not out.exists()
    finally:
        _unlock(held)
    assert not list(tmp_path.iterdir())


def test_sigterm_ends_a_run_with_130_and_removes_its_temporaries(few_prompts, tmp_path):
    """SIGTERM during the teacher's samples left the teacher's temporary bundle in /tmp (break-it pass)."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    out = tmp_path / "student.safetensors"
    args = [str(TOY_TEACHER), "--pipeline", str(TOY_PIPELINE), "--prompts", str(few_prompts), "-o", str(out), *SMALL]
    proc = subprocess.Popen([sys.executable, "-c", DISTILL_SCRIPT, *args], stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TMPDIR": str(tmp)})
    deadline = time.monotonic() + 300
    while not list(tmp.glob("distill-teacher-*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "distill-1x: interrupted" in err, err
    assert not list(tmp.glob("distill-teacher-*")) and not out.exists() and not list(tmp_path.glob(".*lock"))


@pytest.mark.parametrize("edit,message", [
    (lambda s: s.update(step=10**6), "step 1000000 outside 0-40"),
    (lambda s: s.update(step=-5), "step -5 outside 0-40"),
    (lambda s: s["data"]["target"].fill_(float("nan")), "data.target is not finite"),
    (lambda s: s["data"].update(noise=s["data"]["noise"][:, :3]), "data.noise is not torch.float32"),
    (lambda s: s["data"]["prompt"].fill_(99), "a prompt index out of range"),
    (lambda s: s.pop("data"), "missing data"),
    (lambda s: s["student"].update({"transformer.proj_out.weight": torch.zeros(3)}), "its student does not fit the teacher"),
], ids=["step too far", "negative step", "NaN targets", "wrong noise shape", "prompt index", "no data", "student shape"])
def test_a_resume_file_of_this_run_with_bad_contents_is_refused(edit, message, killed_run, few_prompts, tmp_path, capsys):
    """A resume file whose key matches (the run's inputs) but whose contents are wrong gave tracebacks, or silently a
    checkpoint that was not trained (step 10**6) or was NaN (break-it pass)."""
    out = tmp_path / "student.safetensors"
    resume = tmp_path / "student.safetensors.resume"
    args = [str(TOY_TEACHER), "--pipeline", str(TOY_PIPELINE), "--prompts", str(few_prompts), "-o", str(out), *SMALL]
    state = torch.load(killed_run, weights_only=True)
    edit(state)
    torch.save(state, resume)
    assert distill_main([*args, "--resume"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not out.exists()


def test_resume_refuses_a_missing_file_and_other_settings(distilled, few_prompts, tmp_path, capsys):
    out = tmp_path / "s.safetensors"
    args = [str(TOY_TEACHER), "--pipeline", str(TOY_PIPELINE), "--prompts", str(few_prompts), "-o", str(out), *SMALL]
    assert distill_main([*args, "--resume"]) == 2
    assert "does not exist" in capsys.readouterr().err
    state = {"key": "something else", "step": 3}
    torch.save(state, tmp_path / "s.safetensors.resume")
    assert distill_main([*args, "--resume"]) == 2
    assert "other inputs or settings" in capsys.readouterr().err
    (tmp_path / "s.safetensors.resume").write_bytes(b"\x80\x02garbage")
    assert distill_main([*args, "--resume"]) == 2
    assert "not a readable resume file" in capsys.readouterr().err and not out.exists()


def test_a_resume_file_of_another_shift_is_refused_even_where_the_sigmas_agree(killed_run, few_prompts, tmp_path, capsys):
    """Break-it: --resume --shift 2.0001 continued a --shift 2 run (the same snapped sigmas) and recorded 2.0001."""
    out = tmp_path / "student.safetensors"
    (tmp_path / "student.safetensors.resume").write_bytes(killed_run.read_bytes())  # a run with the teacher's shift, 3
    args = [str(TOY_TEACHER), "--pipeline", str(TOY_PIPELINE), "--prompts", str(few_prompts), "-o", str(out), *SMALL]
    assert distill_main([*args, "--shift", "3.0001", "--resume"]) == 2
    assert "other inputs or settings" in capsys.readouterr().err and not out.exists()


def test_help_says_what_each_tool_does(capsys):
    for main, words in ((distill_main, "Distil a 2-step 1.x student"), (fit_main, "Fit only the compensation MLPs")):
        with pytest.raises(SystemExit) as e:
            main(["--help"])
        out = capsys.readouterr().out
        assert e.value.code == 0 and words in out and "--skip-blocks" in out and "--prompts" in out
