import pytest

from envmgr.core.errors import UsageError
from envmgr.core.spec import find_method, list_methods, load_spec


def _write(folder, text):
    folder.mkdir(parents=True)
    (folder / "envmgr.toml").write_text(text)
    return folder / "envmgr.toml"


def test_builtin_sd_demo_spec_loads():
    spec = find_method("sd-demo", None)
    assert spec.backend == "poetry" and spec.gpu == "required" and spec.entry[-1] == "sd-demo.py"
    assert spec.default_model == "stable-diffusion-3.5-medium"


def test_added_methods_are_listed_beside_builtin(tmp_path):
    _write(tmp_path / "methods" / "mine", 'name = "mine"\nentry = ["python", "train.py"]\n')
    names = {m.name: m.builtin for m in list_methods(tmp_path)}
    assert names["mine"] is False and names["sd-demo"] is True


def test_unknown_key_is_named_with_its_line(tmp_path):
    path = _write(tmp_path / "m", 'name = "m"\nentry = ["x"]\ngpus = "all"\n')
    with pytest.raises(UsageError) as err:
        load_spec(path)
    assert f"{path}:3: key 'gpus': unknown key" in str(err.value)


def test_bad_values_say_what_was_expected(tmp_path):
    path = _write(tmp_path / "m", 'name = "m"\nentry = []\ngpu = "sometimes"\n')
    with pytest.raises(UsageError) as err:
        load_spec(path)
    assert "key 'entry'" in str(err.value) and "key 'gpu'" in str(err.value)


def test_unknown_method_lists_known_ones(tmp_path):
    with pytest.raises(UsageError) as err:
        find_method("nope", tmp_path)
    assert "unknown method 'nope'" in str(err.value) and "sd-demo" in str(err.value)


def test_name_must_match_folder(tmp_path):
    path = _write(tmp_path / "folder", 'name = "other"\nentry = ["x"]\n')
    with pytest.raises(UsageError):
        load_spec(path)
