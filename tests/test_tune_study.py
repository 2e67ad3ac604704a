"""fastcifar.tune_study: a storage URL's password never shows, whether the URL parses or a driver quotes it."""

from __future__ import annotations

import pytest

pytest.importorskip("optuna")

import fastcifar.tune_study as tune_study  # noqa: E402
from fastcifar.errors import UserError  # noqa: E402


def test_display_url_masks_the_password_and_keeps_the_rest():
    url = "postgresql://tuner:s3cret-pw@db.example:5432/studies"
    assert tune_study.display_url(url) == "postgresql://tuner:***@db.example:5432/studies"
    assert tune_study.display_url("sqlite:///runs/tune.db") == "sqlite:///runs/tune.db"


def test_an_unparseable_url_still_has_its_password_masked():
    shown = tune_study.display_url("postgresql+psycopg2//tuner:s3cret-pw@db.example/x")  # the colon forgotten
    assert "s3cret" not in shown and "tuner:***@db.example" in shown


def test_a_storage_error_that_quotes_the_url_is_masked(monkeypatch):
    url = "postgresql://tuner:s3cret-pw@db.example:5432/studies"

    class OperationalError(Exception):
        pass

    def refuse(u, **kwargs):
        raise OperationalError(f"could not connect to {u} (password s3cret-pw rejected)")

    monkeypatch.setattr(tune_study.optuna.storages, "RDBStorage", refuse)
    monkeypatch.setattr(tune_study.time, "sleep", lambda s: None)
    with pytest.raises(UserError) as caught:
        tune_study.open_storage(url)
    assert "s3cret" not in str(caught.value) and "tuner:***@db.example" in str(caught.value)
