"""About files: the owner's answers that the model card and the datasheet state."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import make_image_folder

from cifarlab.about import ABOUT_KEYS, read_about, template
from cifarlab.cli import main
from cifarlab.datasheet import QUESTIONS
from cifarlab.errors import ConfigError


def test_yaml_and_toml_read_alike_and_blank_answers_are_no_answers(tmp_path):
    y = tmp_path / "about.yaml"
    y.write_text("model:\n  developers: Ada   Example\n  contact:\ndata:\n  consent: |\n    Signed releases,\n"
                 "    all of them.\n  licence: ''\n")
    t = tmp_path / "about.toml"
    t.write_text('[model]\ndevelopers = "Ada Example"\n[data]\nconsent = "Signed releases, all of them."\n')
    expected = {"model": {"developers": "Ada Example"}, "data": {"consent": "Signed releases, all of them."}}
    assert read_about(y) == read_about(t) == expected
    assert read_about(None) == {"model": {}, "data": {}}


@pytest.mark.parametrize("text, message", [
    ("modle:\n  developers: x\n", "unknown section 'modle' (did you mean 'model'?); valid: model, data"),
    ("data:\n  concent: x\n", "unknown key 'data.concent' (did you mean 'consent'?); valid in 'data': motivation"),
    ("model:\n  developers: 3\n", "'model.developers' must be text, found 3; quote it"),
    ("model: [a, b]\n", "section 'model' must hold keys such as developers, licence, contact, found list"),
    ("model:\n  developers: x\n  developers: y\n", "key 'developers' is given twice"),
    ("- a\n", "must hold a mapping of sections"),
])
def test_a_bad_about_file_is_refused_naming_what_is_wrong(tmp_path, text, message):
    p = tmp_path / "about.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        read_about(p)
    assert message in str(e.value) and "about file" in str(e.value)


def test_the_template_has_every_key_and_reads_as_no_answers(tmp_path):
    p = tmp_path / "about.yaml"
    p.write_text(template())
    assert read_about(p) == {"model": {}, "data": {}}
    parsed = yaml.safe_load(template())
    assert {s: set(v) for s, v in parsed.items()} == {s: set(v) for s, v in ABOUT_KEYS.items()}
    # every question of the datasheet can be answered, and the label caveats beside them
    assert set(ABOUT_KEYS["data"]) == {k for k, _, _ in QUESTIONS} | {"label_caveats"}


def test_datasheet_writes_the_answers_under_their_questions(tmp_path, capsys):
    assert main(["datasheet", "--about-template"]) == 0
    (tmp_path / "about.yaml").write_text(capsys.readouterr().out.replace(
        "  consent:", "  consent: Every person pictured signed a release.").replace(
        "  label_caveats:", "  label_caveats: Cats and dogs were sometimes swapped."))
    data = make_image_folder(tmp_path / "imgs")
    out = tmp_path / "sheet"
    assert main(["datasheet", "--data", str(data), "--out", str(out), "--about", str(tmp_path / "about.yaml")]) == 0
    md = (out / "DATASHEET.md").read_text()
    consent = md.split("**Consent.**")[1].split("**Labelling.**")[0]
    assert "Every person pictured signed a release." in consent and "Not recorded" not in consent
    assert "Known faults of the labels: Cats and dogs were sometimes swapped." in md
    assert md.count("*Not recorded.*") == len(QUESTIONS) - 1
    assert json.loads((out / "datasheet.json").read_text())["answers"]["consent"].startswith("Every person")
    # a bad file stops it before the data is read, with no report
    (tmp_path / "bad.yaml").write_text("data:\n  consnet: yes\n")
    assert main(["datasheet", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "s2"), "--about",
                 str(tmp_path / "bad.yaml")]) == 2
    assert "unknown key 'data.consnet'" in capsys.readouterr().err and not (tmp_path / "s2").exists()


def test_audit_states_the_owners_answers_in_the_model_card(trained_run, image_folder, tmp_path, capsys):
    about = tmp_path / "about.toml"
    about.write_text('[model]\ndevelopers = "Ada Example"\nlicence = "MIT"\ncontact = "ada@example.org"\n'
                     'relevant_factors = "lighting; camera"\n[data]\nconsent = "Signed releases."\n'
                     'licence = "CC BY 4.0"\n')
    assert main(["audit", str(trained_run), "--data", str(image_folder), "--about", str(about), "--out",
                 str(tmp_path / "audit")]) == 0
    card = json.loads((tmp_path / "audit" / "model_card.json").read_text())
    d = card["model_details"]
    assert (d["developers"], d["licence"], d["contact"]) == ("Ada Example", "MIT", "ada@example.org")
    assert card["factors"]["relevant_factors"] == "lighting; camera"
    assert (card["training_data"]["consent"], card["training_data"]["licence"]) == ("Signed releases.", "CC BY 4.0")
    assert any(e.endswith("as the data's owner states it: Signed releases.") for e in card["ethical_considerations"])
    md = (tmp_path / "audit" / "MODEL_CARD.md").read_text()
    assert "Ada Example" in md and "- Consent: Signed releases." in md
    assert card["training_data"]["label_caveats"] == "[TO BE FILLED IN BY THE MODEL'S OWNER]"  # not answered
    capsys.readouterr()
    (tmp_path / "bad.yaml").write_text("model:\n  developer: x\n")
    assert main(["audit", str(trained_run), "--about", str(tmp_path / "bad.yaml"), "--out",
                 str(tmp_path / "a2")]) == 2
    assert "did you mean 'developers'?" in capsys.readouterr().err and not (tmp_path / "a2").exists()
