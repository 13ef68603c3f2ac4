"""The layer-facts label (issue 26): deterministic, versioned, and read back the way the split wrote it."""

from __future__ import annotations

import json

from envmgr.build import sbom
from envmgr.build.layer_facts import ImageFacts, LayerFacts, UnitFacts, dist_info_of, dpkg_packages, parse_read_files, record_files, record_hash
from envmgr.core.paths import LABEL_LAYER_FACTS

STATUS = """Package: zlib1g
Status: install ok installed
Architecture: amd64
Version: 1:1.2.13

Package: gone
Status: deinstall ok config-files
Version: 1.0

Package: base-files
Status: install ok installed
Architecture: amd64
Version: 12.4
"""


def _facts(order: int = 1) -> ImageFacts:
    sbom_facts = {"metadata": {"lyr_apple-1.0": ["lyr-apple", "1.0"], "a_b-2": ["A.B", "2"]},
                  "records": {"lyr_apple-1.0": "ab" * 32}, "conda": []}
    if order < 0:
        sbom_facts = {"conda": [], "records": sbom_facts["records"],
                      "metadata": dict(reversed(list(sbom_facts["metadata"].items())))}
    return ImageFacts(layers=[LayerFacts(diff_id="sha256:" + "1" * 64, size=10240, group="g" * 64,
                                         units=[UnitFacts(key="k" * 64, name="lyr-apple", size=123,
                                                          record="sha256=abc")],
                                         sbom=sbom_facts)],
                      dpkg=dpkg_packages(STATUS))


def test_the_label_is_the_same_text_whatever_order_its_facts_were_gathered_in():
    assert _facts(1).to_label() == _facts(-1).to_label()
    assert " " not in _facts().to_label()


def test_the_label_reads_back_and_another_version_or_garbage_reads_as_none():
    text = _facts().to_label()
    assert ImageFacts.from_labels({LABEL_LAYER_FACTS: text}) == _facts()
    other = json.loads(text) | {"version": 99}
    assert ImageFacts.from_labels({LABEL_LAYER_FACTS: json.dumps(other)}) is None
    assert ImageFacts.from_labels({LABEL_LAYER_FACTS: "{not json"}) is None
    assert ImageFacts.from_labels({}) is None and ImageFacts.from_labels(None) is None


def test_unit_gpu_archs_are_left_out_of_the_label_unless_set():
    assert "gpu_archs" not in _facts().to_label()
    torch = UnitFacts(key="t", name="torch", size=1, record="sha256=x", gpu_archs=["sm_80", "sm_90"])
    assert '"gpu_archs":["sm_80","sm_90"]' in ImageFacts(layers=[LayerFacts(
        diff_id="sha256:2", size=1, units=[torch], sbom={})], dpkg=[]).to_label()


def test_dpkg_rows_give_the_components_the_status_text_gives():
    rows = dpkg_packages(STATUS)
    assert rows == [["base-files", "12.4", "amd64"], ["zlib1g", "1:1.2.13", "amd64"]]
    from_text = [(c.name, c.version, str(c.purl)) for c in sbom.debian_components(STATUS)]
    from_rows = [(c.name, c.version, str(c.purl)) for c in sbom.debian_components(rows)]
    assert from_text == from_rows and len(from_rows) == 2


def test_record_rows_are_paths_in_the_prefix_sorted_the_last_row_of_a_path_winning():
    record = (b"lyr_apple/__init__.py,sha256=aaa,10\r\n../../../bin/lyr-tool,sha256=bbb,20\n"
              b"lyr_apple/__init__.py,sha256=ccc,11\nlyr_apple-1.0.dist-info/RECORD,,\n\n")
    site, prefix = "/opt/p/lib/python3.11/site-packages", "/opt/p"
    assert record_files(record, site, prefix) == [
        ["bin/lyr-tool", "sha256=bbb", "20"],
        ["lib/python3.11/site-packages/lyr_apple-1.0.dist-info/RECORD", "", ""],
        ["lib/python3.11/site-packages/lyr_apple/__init__.py", "sha256=ccc", "11"]]
    assert record_hash(b"") == "sha256=47DEQpj8HBSa-_TImW-5JCeuQeRkm5NMpJWZG3hSuFU"


def test_a_record_naming_a_file_outside_the_prefix_is_refused():
    import pytest

    with pytest.raises(ValueError):
        record_files(b"../../../../../etc/passwd,sha256=x,1\n", "/opt/p/lib/python3.11/site-packages", "/opt/p")


def test_the_dist_info_of_a_unit_is_found_by_its_normalized_name():
    layer = _facts().layers[0]
    assert dist_info_of(layer, "lyr_apple") == "lyr_apple-1.0.dist-info"
    assert dist_info_of(layer, "a-b") == "a_b-2.dist-info"
    assert dist_info_of(layer, "missing") is None


def test_files_printed_by_the_read_script_are_parsed_back_byte_for_byte():
    import base64

    data = bytes(range(256)) * 100 + b"\r\n"
    text = base64.b64encode(data).decode()
    lines = ["noise", "ENVMGR-FILE /a/RECORD", *[f"ENVMGR-DATA {text[i:i + 8000]}" for i in range(0, len(text), 8000)],
             "ENVMGR-END", "ENVMGR-FILE-MISSING /b/RECORD", "ENVMGR-FILE /c", "ENVMGR-END"]
    assert parse_read_files(lines) == {"/a/RECORD": data, "/c": b""}
