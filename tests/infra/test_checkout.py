"""What a clone of this repository gives on any platform, and what its deploy files say about themselves:
shell scripts the image and `make` run keep LF line endings (a Windows clone with core.autocrlf=true would
otherwise break them), and the Dockerfile's and the template's own comments agree with what they build."""

from __future__ import annotations

import re
import subprocess

from deployables import DOCKERFILE, ROOT, TEMPLATE, parse_dockerfile


def scripts() -> list[str]:
    listed = subprocess.run(["git", "ls-files", "*.sh"], cwd=ROOT, capture_output=True, text=True, check=True)
    return [*listed.stdout.split(), ".ci/run"]


def test_every_shell_script_is_checked_out_with_lf_line_endings_everywhere():
    # GIVEN every shell script of the repository (the entry script the image runs among them)
    names = scripts()
    assert "infra/entrypoint.sh" in names
    # WHEN git says how it checks them out (.gitattributes, as any clone reads it)
    attributes = subprocess.run(
        ["git", "check-attr", "eol", "text", "--", *names], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    # THEN each is text with LF endings, whatever core.autocrlf says
    for name in names:
        assert f"{name}: eol: lf" in attributes, attributes
        assert f"{name}: text: set" in attributes, attributes


def test_the_dockerfiles_usage_comment_names_the_format_it_bakes_by_default():
    default_format = parse_dockerfile().args()["MODEL_FORMAT"]
    usage = next(line for line in DOCKERFILE.read_text().splitlines() if "docker build -t" in line)
    assert f"bakes microsoft/phi-2 ({default_format})" in usage


def test_the_template_and_the_readme_give_the_same_image_size():
    readme_total = re.search(r"\*\*total\*\* \| \*\*~([0-9.]+) GB\*\*", (ROOT / "README.md").read_text())
    template_size = re.search(r"The image is ~([0-9.]+) GB", TEMPLATE.read_text())
    assert readme_total and template_size
    assert readme_total.group(1) == template_size.group(1)
