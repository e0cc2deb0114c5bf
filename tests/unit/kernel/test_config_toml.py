"""Every TOML file is read by sealroom.config.parse_toml: absurd nesting is a usage error that
names the file (exit 2), never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sealroom.config import load_toml, parse_toml
from sealroom.errors import ConfigError
from sealroom.policy import load_policy_file

DEEP = "[" * 2000 + "]" * 2000


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sealroom.cli", *args], capture_output=True, text=True, timeout=120, cwd=cwd
    )


def test_parse_toml_names_the_file_for_deep_nesting_and_bad_syntax(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^deep.toml: arrays or tables nested too deeply") as info:
        parse_toml(f"a = {DEEP}\n", source="deep.toml")
    assert info.value.details == {"file": "deep.toml"}
    with pytest.raises(ConfigError, match=r"^bad.toml: not valid TOML"):
        parse_toml("a = [", source="bad.toml")
    path = tmp_path / "ok.toml"
    path.write_text("[limits]\nmax_in_list = 5\n")
    assert load_toml(path) == {"limits": {"max_in_list": 5}}
    deep = tmp_path / "policy.toml"
    deep.write_text(f"version = 1\nmin_group_size = {DEEP}\n")
    with pytest.raises(ConfigError, match="policy.toml: arrays or tables nested too deeply"):
        load_policy_file(deep)


def test_local_with_a_deeply_nested_policy_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text("customer_id,amount\n1,2\n")
    (tmp_path / "policy.toml").write_text(f"version = 1\nmin_group_size = {DEEP}\n")
    proc = cli(
        "local", "--dataset", "me.a=a.csv", "--policy", "me.a=policy.toml", "SELECT COUNT(*) FROM me.a", cwd=tmp_path
    )
    assert proc.returncode == 2, proc.stderr
    assert "policy.toml: arrays or tables nested too deeply" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("component", ["coordinator", "enclave", "party"])
def test_serve_with_a_deeply_nested_config_is_a_usage_error(tmp_path: Path, component: str) -> None:
    (tmp_path / "c.toml").write_text(f"[{component}]\nx = {DEEP}\n")
    proc = cli(component, "serve", "--config", "c.toml", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "c.toml: arrays or tables nested too deeply" in proc.stderr
    assert "Traceback" not in proc.stderr
