"""The option schema (methods/options.py): one declaration per option, read by the methods, the
command line, the benchmark and (without torch) the panels."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from JointRegSegLib.cli import main
from JointRegSegLib.errors import InputError
from JointRegSegLib.methods import get_method, method_names
from JointRegSegLib.methods.base import Options
from JointRegSegLib.methods.options import OPTIONS, defaults, parse_options, specs, validate_options


def test_schema_imports_without_torch_numpy_simpleitk_or_nibabel():
    code = (
        "import sys, json; from JointRegSegLib.methods.options import OPTIONS, validate_options; "
        "validate_options('tto', {'mi_bins': '16'}); "
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy', 'SimpleITK', 'nibabel'))))"
    )
    loaded = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert loaded == []


def test_every_method_declares_its_options():
    assert sorted(OPTIONS) == method_names()
    for method in method_names():
        names = [spec.name for spec in specs(method)]
        assert len(names) == len(set(names)) and all(spec.help for spec in specs(method))
        assert validate_options(method, {}) == {k: tuple(v) if isinstance(v, list) else v for k, v in defaults(method).items()}


@pytest.mark.parametrize("method", ["tto", "uresnet", "jers", "hof"])
def test_methods_read_their_options_through_the_schema(method):
    from importlib import import_module

    module = import_module(f"JointRegSegLib.methods.{method}")
    settings = module._settings(Options(extra={}), "cpu") if method == "tto" else module._settings(Options(extra={}))
    declared = validate_options(method, {})
    assert declared.keys() <= settings.keys()
    # every declared default reaches the method as declared; "auto" (None) ones the method resolves itself
    assert {k: settings[k] for k, v in declared.items() if v is not None} == {k: v for k, v in declared.items() if v is not None}
    with pytest.raises(InputError, match=f"unknown {method} option"):
        get_method(method).register(None, Options(extra={"no_such_option": 1}), None)


def test_segreg_settings_come_from_the_schema():
    from JointRegSegLib.methods.segreg import DEFAULT_WEIGHTS, Settings

    settings = Settings.from_options(Options(extra={"mask_loss": "EDT", "levels": "4, 2", "regions": "3"}))
    assert (settings.mask_loss, settings.weights, settings.levels, settings.regions) == ("edt", DEFAULT_WEIGHTS["edt"], (4, 2), 3)
    assert settings.weights_name == "segreg-edt"
    with pytest.raises(InputError, match="'level_iterations' needs one count per pyramid level"):
        Settings.from_options(Options(extra={"levels": [4, 2, 1], "level_iterations": [10, 10]}))


def test_values_are_converted_from_text_and_json():
    values = validate_options("tto", parse_options(["mi_bins=32.0", "tto=False", "affine_iterations=[10,0,5]", "spacing=2.5", "network=Teacher"]))
    assert (values["mi_bins"], values["tto"], values["affine_iterations"], values["spacing"], values["network"]) == (32, False, (10, 0, 5), 2.5, "teacher")
    assert validate_options("tto", {"affine_iterations": "10 0 5"})["affine_iterations"] == (10, 0, 5)
    assert validate_options("tto", {"lr": None})["lr"] == 1e-3  # null stands for the default


@pytest.mark.parametrize(
    "method, raw, words",
    [
        ("tto", {"mi_bins": 2.5}, "'mi_bins' must be a whole number from 2 to 256; got 2.5"),
        ("tto", {"mi_bins": True}, "'mi_bins'"),
        ("tto", {"lr": 0}, "'lr' must be a number > 0 and <= 1"),
        ("tto", {"affine_iterations": [1, 2, -3]}, "'affine_iterations'"),
        ("tto", {"affine_iterations": 5}, "'affine_iterations'"),
        ("tto", {"network": 3}, "'network' must be one of 'student', 'teacher'"),
        ("segreg", {"weights": [1, 1]}, "'weights' must be a list of 3 numbers"),
        ("segreg", {"levels": [4, 3]}, "among 1, 2, 4, 8, 16"),
        ("segreg", {"weights_name": ""}, "'weights_name' must be a non-empty name"),
        ("segreg", {"regions": "fine"}, "'regions' must be 'all' or 'coarse' or a whole number"),
        ("uresnet", {"segment_fixed": "yes"}, "'segment_fixed' must be true or false"),
        ("jers", {"extraction_stages": 21}, "from 1 to 20"),
        ("hof", {"weights": "hof_v2"}, "'hof_unfrozen'"),
    ],
)
def test_each_bad_value_names_the_option_and_the_accepted_values(method, raw, words):
    with pytest.raises(InputError) as info:
        validate_options(method, raw)
    assert words in str(info.value) and "\n" not in str(info.value)


def test_register_help_lists_every_option_with_default_and_meaning(capsys):
    assert main(["register", "--help"]) == 0
    text = capsys.readouterr().out
    for method in method_names():
        assert f"{method} options (--option KEY=VALUE):" in text
        for spec in specs(method):
            assert f"  {spec.name}={spec.default_text()}" in text and spec.help in " ".join(text.split())


def test_bench_refuses_a_bad_option_before_running():
    from JointRegSegLib.bench.runner import BenchSettings

    with pytest.raises(InputError, match="tto option 'mi_bins'"):
        BenchSettings(methods=["tto[mi_bins=abc]"], peers=[]).check()
    with pytest.raises(InputError, match="unknown segreg option"):
        BenchSettings(methods=["segreg"], peers=[], options={"mi_bins": 8}).check()
