"""The methods registry (conmh.methods): every method keeps the interface the pipeline calls, a fitted
model round-trips exactly, and a bad method name or configuration is refused with a clear message."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from conmh import methods
from conmh.codes import Codes, unpack_bits
from conmh.errors import ConfigError
from conmh.pipeline import config as settings
from helpers.tiny import SPEC

ROOT = Path(__file__).resolve().parents[2]
# What each method's fit takes in this test: ConMH a tiny CPU training, the baselines their seed.
OPTIONS = {
    "conmh": {"preset": "mini", "device": "cpu", "epochs": 1, "batch_size": 16},
    "itq": {"seed": 3},
    "lsh": {"seed": 3},
}


def test_the_package_holds_conmh_and_its_two_baselines():
    assert methods.names() == ["conmh", "itq", "lsh"]
    assert [methods.get(m).DISPLAY for m in methods.names()] == ["ConMH", "ITQ", "LSH"]
    assert methods.uses_gpu("conmh") and not methods.uses_gpu("lsh") and not methods.uses_gpu("itq")


@pytest.mark.parametrize("name", ["conmh", "itq", "lsh"])
def test_a_method_fits_then_encodes_the_same_codes_every_time(name, tiny_data, tmp_path):
    """fit writes one model file; encode reads it and codes the database and the queries (ActivityNet has
    its own), the same codes each time, with the method's name in them."""
    module, model = methods.get(name), tmp_path / "model.pt"
    fit_options = OPTIONS[name]
    module.fit("activitynet", tiny_data, 16, model, **fit_options)
    assert model.is_file()
    encode_options = {k: v for k, v in fit_options.items() if k in ("preset", "device")} if name == "conmh" else {}
    first = module.encode(model, "activitynet", tiny_data, 16, **encode_options)
    again = module.encode(model, "activitynet", tiny_data, 16, **encode_options)
    assert isinstance(first, Codes) and (first.method, first.bits, first.dataset) == (name, 16, "activitynet")
    assert unpack_bits(first.database, 16).shape == (SPEC.n_database, 16)
    assert unpack_bits(first.queries, 16).shape == (SPEC.n_queries, 16)
    assert np.array_equal(first.database, again.database) and np.array_equal(first.queries, again.queries)


@pytest.mark.parametrize("name", ["itq", "lsh"])
def test_a_model_fitted_for_other_code_lengths_is_refused(name, tiny_data, tmp_path):
    methods.get(name).fit("activitynet", tiny_data, 16, tmp_path / "model.pt", seed=1)
    with pytest.raises(ConfigError, match=r"model\.pt: fitted for 16-bit codes, asked for 32"):
        methods.get(name).encode(tmp_path / "model.pt", "activitynet", tiny_data, 32)


def test_a_fitted_model_round_trips_exactly(tmp_path):
    arrays = {"mean": np.random.default_rng(0).standard_normal(7), "w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    methods.save_arrays(tmp_path / "m.pt", {**arrays, "seed": 4, "n_iter": 50})
    back = methods.load_arrays(tmp_path / "m.pt")
    assert back["seed"] == 4 and back["n_iter"] == 50
    for key, value in arrays.items():
        assert back[key].dtype == value.dtype and np.array_equal(back[key], value)
    methods.save_arrays(tmp_path / "again.pt", {**arrays, "seed": 4, "n_iter": 50})
    assert (tmp_path / "again.pt").read_bytes() == (tmp_path / "m.pt").read_bytes()  # DVC sees the same file


def test_an_unknown_method_is_refused_naming_the_known_ones():
    with pytest.raises(ConfigError, match="unknown method 'sh': known methods are conmh, itq, lsh"):
        methods.get("sh")


def test_the_configuration_lists_known_methods_each_with_its_options():
    raw = yaml.safe_load((ROOT / "config.yaml").read_text())
    assert settings.check_config(raw)["methods"] == ["conmh", "itq", "lsh"]
    with pytest.raises(ConfigError, match=r"methods\[1\]: 'sh' is not one of \['conmh', 'itq', 'lsh'\]"):
        settings.check_config({**raw, "methods": ["conmh", "sh"]})
    options = {k: v for k, v in raw["options"].items() if k != "itq"}
    with pytest.raises(ConfigError, match=r"options\.itq: missing; give every method"):
        settings.check_config({**raw, "options": options})
    # --config gives strings: an option's number becomes a number again
    assert settings.check_config({**raw, "options": {**raw["options"], "lsh": {"seed": "2"}}})["options"]["lsh"] == {
        "seed": 2
    }


def test_the_steps_thread_count_reaches_numpys_blas():
    """Snakemake sets OPENBLAS_NUM_THREADS to a job's threads, a DVC stage does not: the thread count the
    steps set (``conmh.device.set_threads``) must reach numpy's BLAS itself, or the two engines fit
    different ITQ models (its rotation's low bits depend on the BLAS thread count)."""
    import os
    import subprocess
    import sys

    from conmh.hamming import available_cpus

    if available_cpus() < 2:
        pytest.skip("one CPU: BLAS runs one thread anyway")
    code = (
        "import numpy\n"
        "from threadpoolctl import threadpool_info\n"
        "from conmh.device import set_threads\n"
        "set_threads(1)\n"
        "print(sorted({i['num_threads'] for i in threadpool_info() if i['user_api'] == 'blas'}))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.endswith("_NUM_THREADS")}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[1]"
