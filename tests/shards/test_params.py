"""Stage parameters declared once (shards/params.py): CLI options, YAML sections, errors naming the field."""
from __future__ import annotations

from typing import Literal

import click
import pytest
from click.testing import CliRunner
from pydantic import Field

from webcurate.shards.errors import ConfigError
from webcurate.shards.params import Params, click_options, from_cli, load_yaml, parse, parse_sections


class Dedup(Params):
    method: Literal["exact", "copy"] = Field("copy", description="which dedup")
    k: int = Field(64, ge=1, description="neighbours per sample")
    threshold: float | None = Field(None, gt=0, le=1, description="cosine threshold")
    against: list[str] = Field(default_factory=list, description="evaluation sets")
    allow_mass_removal: bool = Field(False, description="allow removing most of the pool")


@click.command()
@click_options(Dedup)
def _cmd(**kw):
    click.echo(repr(from_cli(Dedup, kw).as_record()))


def test_click_options_come_from_the_model_with_types_defaults_and_help():
    r = CliRunner().invoke(_cmd, ["--help"])
    assert r.exit_code == 0
    for text in ("--method [exact|copy]", "neighbours per sample", "[default: 64]",
                 "--allow-mass-removal / --no-allow-mass-removal"):
        assert text in r.output


def test_cli_values_are_validated_by_the_model():
    r = CliRunner().invoke(_cmd, ["--k", "3", "--against", "a", "--against", "b", "--allow-mass-removal"])
    assert r.exit_code == 0, r.output
    assert "'k': 3" in r.output and "'against': ['a', 'b']" in r.output and "'allow_mass_removal': True" in r.output
    r = CliRunner().invoke(_cmd, ["--k", "0"])
    assert isinstance(r.exception, ConfigError) and "--k" in str(r.exception)


def test_a_yaml_section_with_a_wrong_type_names_the_file_section_and_field():
    with pytest.raises(ConfigError) as e:
        parse(Dedup, {"k": "lots"}, "curate.yaml", section="dedup")
    assert str(e.value).startswith("curate.yaml: dedup.k:") and "'lots'" in str(e.value)


def test_unknown_keys_are_refused_with_the_allowed_ones():
    with pytest.raises(ConfigError, match=r"dedup.kk: unknown key; allowed: .*\bk\b"):
        parse(Dedup, {"kk": 3}, "curate.yaml", section="dedup")
    with pytest.raises(ConfigError, match="unknown key.*dedupe"):
        parse_sections({"dedupe": {}}, {"dedup": Dedup}, "curate.yaml", top_level={"input"})


def test_sections_default_turn_off_and_validate():
    out = parse_sections({"input": "x", "dedup": False}, {"dedup": Dedup}, "c.yaml", top_level={"input"})
    assert out["dedup"] is None
    out = parse_sections({}, {"dedup": Dedup}, "c.yaml")
    assert out["dedup"] == Dedup()
    with pytest.raises(ConfigError, match="`dedup` must be a mapping"):
        parse_sections({"dedup": 3}, {"dedup": Dedup}, "c.yaml")


def test_load_yaml_refuses_python_tags_and_non_mappings(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("a: !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(str(p))
    p.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_yaml(str(p))
    with pytest.raises(ConfigError, match="does not exist"):
        load_yaml(str(tmp_path / "missing.yaml"))
    p.write_text("dedup: {k: 5}\n")
    assert load_yaml(str(p))[0] == {"dedup": {"k": 5}}
