"""`make fuzz` finds its targets: every test module with hypothesis properties, unless it says why not."""

from __future__ import annotations

from tests.properties.campaign import ROOT, discover, target_name

PROPERTY = "from hypothesis import given\n\n@given(st.integers())\ndef test_p(x):\n    pass\n"


def test_modules_with_properties_are_targets_and_a_module_may_say_why_it_is_left_out(tmp_path):
    (tmp_path / "properties").mkdir()
    (tmp_path / "unit").mkdir()
    (tmp_path / "properties" / "test_parser.py").write_text(PROPERTY)
    (tmp_path / "unit" / "test_codec.py").write_text("import hypothesis\n\n@hypothesis.given(x=st.none())\n"
                                                     "def test_q(x):\n    pass\n")
    (tmp_path / "unit" / "test_plain.py").write_text("def test_r():\n    pass\n")
    (tmp_path / "unit" / "test_model.py").write_text('CAMPAIGN_LEFT_OUT = "real sockets"  # why\n' + PROPERTY)
    chosen, left_out = discover(tmp_path)
    assert chosen == [tmp_path / "properties" / "test_parser.py", tmp_path / "unit" / "test_codec.py"]
    assert left_out == {tmp_path / "unit" / "test_model.py": "real sockets"}


def test_every_parser_of_outside_input_named_in_issue_12_is_fuzzed():
    chosen, left_out = discover()
    names = {target_name(path) for path in chosen}
    assert {
        "test_amqp_codec.py", "test_amqp_tap.py", "unit/test_amqp_inspect.py",  # AMQP: checks, the relay's tap
        "test_proxy_protocol.py", "unit/test_proxy_protocol_tls.py",  # PROXY v1/v2 with its SSL TLVs
        "test_tls_files.py",  # certificates, keys, CA bundles, CRLs
        "test_importer_input.py", "unit/test_importer.py",  # haproxy.cfg, keepalived.conf
        "test_stats_http.py", "test_ctl_commands.py", "test_config_loader.py", "test_vip_packet.py",
        "unit/test_vip_peerlink.py",
    } <= names
    assert {target_name(path) for path in left_out} == {"unit/test_relay_paths.py", "unit/test_kernel_handover.py"}
    assert all(path.is_relative_to(ROOT / "tests") for path in chosen)
