"""The name a server answers to: short and path-free by default, ``rematch`` always accepted."""

from __future__ import annotations

from rematch.hub.names import short_name
from rematch.serving.names import served_names
from rematch.serving.settings import ServeSettings


def test_short_names_never_carry_a_path(tmp_path):
    (tmp_path / "runs" / "demo" / "model").mkdir(parents=True)
    (tmp_path / "rematch-2b").mkdir()
    assert short_name(str(tmp_path / "rematch-2b")) == "rematch-2b"
    assert short_name(str(tmp_path / "rematch-2b") + "/") == "rematch-2b"
    assert short_name(str(tmp_path / "runs" / "demo" / "model")) == "demo"  # RUN/model is named after its run
    assert short_name("org/name@v2") == "org/name"
    assert short_name("tiny:small") == "tiny:small"


def test_served_names_default_and_given(tmp_path):
    (tmp_path / "shapes").mkdir()
    assert served_names(str(tmp_path / "shapes")) == ("shapes", ("rematch",))
    assert served_names("org/name") == ("org/name", ("rematch",))
    assert served_names("org/name", ["mine", "alias"]) == ("mine", ("alias", "rematch"))
    assert served_names("org/name", ["rematch"]) == ("rematch", ())
    settings = ServeSettings(served_model_name="mine", model_aliases=("alias", "rematch"))
    assert settings.model_names == ("mine", "alias", "rematch") and settings.serves("alias")
    assert not settings.serves(str(tmp_path))
