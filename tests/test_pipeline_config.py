"""JobConfig: flags, config files, precedence, and the one-line refusals (exit status 2)."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.config import GROUPS, ConfigError, JobConfig, _opt, build_parser, parse_args
from pipeline.job import actor_resources, main
from pipeline_data import save_test_model, write_parquet_shard

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_run_the_bundled_job():
    config = parse_args("caption", [])
    assert config == JobConfig(task="caption")
    assert Path(config.input) == ROOT / "pipeline" / "assets" / "samples" and config.output == "out"
    assert config.model == "bundled" and config.reducer == "none"


def test_default_instructions_follow_the_model_and_fit_the_bundled_vocabulary():
    from pipeline.decode import load_processor, unknown_words
    from reference.scenes import CAPTION_QUESTION

    bundled = parse_args("vqa", [])
    assert bundled.prompt == CAPTION_QUESTION  # what the reference model was trained to caption on
    tokenizer = load_processor("bundled").tokenizer
    assert unknown_words(tokenizer, bundled.prompt) == unknown_words(tokenizer, bundled.question) == []
    assert unknown_words(tokenizer, "what colour is the octagon ?") == ["octagon"]
    other = parse_args("vqa", ["--model", "org/llava"])
    assert other.prompt == "Write a short caption for the image." and other.question == "What is shown in the image?"
    assert parse_args("caption", ["--prompt", "describe the image ."]).prompt == "describe the image ."


def test_flags_map_onto_fields():
    config = parse_args("vqa", ["--reducer", "fastv", "--ratio", "0.25", "--actors", "2,4", "--gpus-per-actor", "0.5",
                                "--dtype", "fp32", "--batch-size", "3", "--overwrite", "--question", "Why?"])
    assert (config.task, config.reducer, config.ratio, config.actors) == ("vqa", "fastv", 0.25, (2, 4))
    assert (config.gpus_per_actor, config.dtype, config.batch_size, config.overwrite) == (0.5, "fp32", 3, True)
    assert config.question == "Why?" and config.visual_tokens is None
    limits = parse_args("caption", ["--max-image-pixels", "1000000", "--io-retry-seconds", "2.5"])
    assert (limits.max_image_pixels, limits.io_retry_seconds) == (1_000_000, 2.5)


def test_every_option_has_a_flag_with_its_default_in_help():
    text = build_parser("caption").format_help()
    for name, field in JobConfig.__dataclass_fields__.items():
        if field.metadata["flag"]:
            assert "--" + name.replace("_", "-") in text
    assert text.count("default:") >= sum(f.metadata["flag"] for f in JobConfig.__dataclass_fields__.values())


@pytest.mark.parametrize("task", ["caption", "vqa"])
def test_help_lists_every_flag_in_one_of_the_readme_sections(task):
    parser = build_parser(task)
    general = {"-h", "--config"}  # argparse's own section: help and the settings file, which spans every section
    fields = [f for f in JobConfig.__dataclass_fields__.values() if f.metadata["flag"]]
    assert all(f.metadata["group"] in GROUPS for f in fields)
    job_sections = [g for g in GROUPS if any(f.metadata["group"] == g for f in fields)]  # "planner" is plan.py's
    sections = {group.title: [a for a in group._group_actions] for group in parser._action_groups}
    assert set(job_sections) <= set(sections) and "planner" not in sections
    for action in parser._actions:
        strings = set(action.option_strings)
        homes = [title for title, actions in sections.items() if action in actions]
        if strings & general:
            assert homes == ["options"], strings
        else:
            assert len(homes) == 1 and homes[0] in GROUPS, (strings, homes)
    text = parser.format_help()
    assert [text.index(f"\n{t}:\n") for t in job_sections] == sorted(text.index(f"\n{t}:\n") for t in job_sections)
    # the budget flags stay exclusive inside their section
    assert "[--visual-tokens N | --ratio R]" in " ".join(parser.format_usage().split())


def test_a_flag_declares_a_known_help_section():
    with pytest.raises(ValueError, match="unknown --help group 'io'"):
        _opt(1, "a flag in a section that does not exist", "N", group="io")
    with pytest.raises(TypeError, match="group"):
        _opt(1, "a flag without a section", "N")


def test_actor_resources_default_to_a_gpu_each_or_half_a_cpu():
    assert actor_resources(JobConfig(), cluster_gpus=8) == (1.0, 1.0)
    assert actor_resources(JobConfig(), cluster_gpus=0) == (0.0, 0.5)
    assert actor_resources(JobConfig(gpus_per_actor=0.5, cpus_per_actor=4), cluster_gpus=8) == (0.5, 4)


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_config_file_and_flag_precedence(tmp_path, suffix):
    settings = {"reducer": "fastv", "visual-tokens": 32, "batch_size": 5, "actors": "1,3", "max_new_tokens": 7}
    path = tmp_path / f"job{suffix}"
    path.write_text(json.dumps(settings))  # JSON is valid YAML too
    config = parse_args("caption", ["--config", str(path), "--batch-size", "9"])
    assert (config.reducer, config.visual_tokens, config.actors, config.max_new_tokens) == ("fastv", 32, (1, 3), 7)
    assert config.batch_size == 9  # the flag wins over the file


@pytest.mark.parametrize("argv, message", [
    (["--actors", "3,1"], "--actors"),
    (["--batch-size", "0"], "--batch-size"),
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--batch-size", "many"], "--batch-size must be a positive integer or auto, got 'many'"),
    (["--ratio", "a third"], "--ratio must be a number"),
    (["--actors", "a,b"], "--actors takes MIN,MAX"),
    (["--gpus-per-actor", "-1"], "--gpus-per-actor must not be negative"),
    (["--price-per-gpu-hour", "-2"], "--price-per-gpu-hour must not be negative"),
    (["--max-image-pixels", "0"], "--max-image-pixels"),
    (["--io-retry-seconds", "-1"], "--io-retry-seconds"),
])
def test_bad_values_are_refused(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_args("caption", argv)


def test_config_file_errors(tmp_path):
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("reducer: none\nbatchsize: 3\n")
    with pytest.raises(ConfigError, match="batchsize"):
        parse_args("caption", ["--config", str(unknown)])
    both = tmp_path / "both.yaml"
    both.write_text("visual_tokens: 10\nratio: 0.5\n")
    with pytest.raises(ConfigError, match="either"):
        parse_args("caption", ["--config", str(both)])
    with pytest.raises(ConfigError, match="cannot read"):
        parse_args("caption", ["--config", str(tmp_path / "missing.yaml")])
    wrong_type = tmp_path / "wrong.yaml"
    wrong_type.write_text("batch_size: many\n")
    with pytest.raises(ConfigError, match="--batch-size must be a positive integer or auto"):
        parse_args("caption", ["--config", str(wrong_type)])


def test_budget_flags_are_exclusive_on_the_command_line():
    with pytest.raises(SystemExit) as exit_info:
        parse_args("caption", ["--visual-tokens", "8", "--ratio", "0.5"])
    assert exit_info.value.code == 2


@pytest.fixture
def refusal_cases(tmp_path) -> dict[str, list[str]]:
    """A reason each, expected in the one error line -> the flags of a job that must be refused."""
    model = str(save_test_model(tmp_path / "model"))
    images = tmp_path / "in"
    images.mkdir()
    (images / "a.png").write_bytes(b"not opened before the job starts")
    (tmp_path / "empty").mkdir()
    blocked = tmp_path / "file-not-dir"
    blocked.write_text("x")
    other_columns = tmp_path / "other-columns"
    write_parquet_shard(other_columns / "0.parquet", {"k": b"jpeg bytes"})
    pq.write_table(pq.read_table(other_columns / "0.parquet").rename_columns(["key", "jpg"]),
                   other_columns / "0.parquet")
    corrupt_parquet = tmp_path / "corrupt-parquet"
    write_parquet_shard(corrupt_parquet / "0.parquet", {"k": b"jpeg bytes"})
    (corrupt_parquet / "0.parquet").write_bytes((corrupt_parquet / "0.parquet").read_bytes()[:-12])  # footer cut
    not_a_tar = tmp_path / "not-a-tar"
    not_a_tar.mkdir()
    (not_a_tar / "00000.tar").write_bytes(b"<html>an error page saved as a shard</html>\n" * 20)
    common = ["--input", str(images), "--output", str(tmp_path / "out"), "--model", model]
    return {
        "input not found": [*common, "--input", str(tmp_path / "nope")],
        "input is empty": [*common, "--input", str(tmp_path / "empty")],
        "not writable": [*common, "--output", str(blocked / "sub")],
        "model not found": [*common, "--model", str(tmp_path / "no-model")],
        "unknown reduction method": [*common, "--reducer", "no-such-method"],
        "--visual-tokens 100000 is above the full count": [*common, "--reducer", "fastv", "--visual-tokens", "100000"],
        "give exactly one budget: --visual-tokens N (": [*common, "--reducer", "fastv"],
        ") or --ratio R (": [*common, "--reducer", "visionzip"],
        "the budget --ratio 1.5 is not in (0, 1]": [*common, "--reducer", "fastv", "--ratio", "1.5"],
        "the budget --visual-tokens 0 is not a positive integer": [*common, "--reducer", "st3", "--visual-tokens", "0"],
        "takes no budget: drop --ratio 0.5": [*common, "--ratio", "0.5"],
        "asked --ratio 0.01 = ": [*common, "--reducer", "fastv", "--ratio", "0.01"],
        "has no column 'id'": [*common, "--input", str(other_columns)],
        "Parquet input 0.parquet cannot be read": [*common, "--input", str(corrupt_parquet)],
        "WebDataset input 00000.tar is not a readable tar file": [*common, "--input", str(not_a_tar)],
        "--memory-per-actor 1.0 MiB does not hold one row at --reducer visionzip --ratio 0.11 with --batch-size auto":
            [*common, "--batch-size", "auto", "--memory-per-actor", "1MiB", "--reducer", "visionzip", "--ratio", "0.11"],
        "--memory-per-actor: cannot read '4 apples' as a size": [*common, "--batch-size", "auto",
                                                                 "--memory-per-actor", "4 apples"],
        "--batch-size must be a positive integer or auto, got 'big'": [*common, "--batch-size", "big"],
        "does not know: 'Write', 'short', 'caption'": [*common, "--model", "bundled",
                                                       "--prompt", "Write a short caption for the image ."],
    }


def test_refusals_exit_2_with_one_line_before_any_model_loads(refusal_cases, tmp_path, capsys, monkeypatch):
    loaded = []
    monkeypatch.setattr("pipeline.actor.load_model", lambda *a: loaded.append(a))  # must never be reached
    for reason, argv in refusal_cases.items():
        assert main("caption", argv) == 2, reason
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("caption.py: error:") and reason in lines[0], (reason, lines)
        # said in the command line's words: a flag, never a Python keyword of reducers.attach
        assert re.search(r"--[a-z]", lines[0]) and not re.search(r"\b[a-z_]+=", lines[0]), lines[0]
    assert not loaded and not (tmp_path / "out" / "results").exists()


def test_the_script_exits_2(refusal_cases):
    result = subprocess.run([sys.executable, str(ROOT / "jobs" / "vqa.py"), *refusal_cases["input not found"]],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.strip().startswith("vqa.py: error: input not found")
