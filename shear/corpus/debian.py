"""Where the Debian packages of the built-in domains install their text, the one-line
error for a missing one, and the exact versions installed (for reports/corpus.json)."""
from __future__ import annotations

import subprocess
from pathlib import Path

from shear.errors import ShearError

JANEAUSTENR = Path("/usr/lib/R/site-library/janeaustenr/data")
DICTD = Path("/usr/share/dictd")
PYDOC = Path("/usr/share/doc/python3.11/html/_sources")
DERIVATIONS = Path("/usr/share/doc/derivations/derivations.pdf")
DEBIAN_FAQ = Path("/usr/share/doc/debian/FAQ/debian-faq.en.txt.gz")
MAN = Path("/usr/share/man")


def require(path: str | Path, domain: str, package: str) -> Path:
    """Return `path`, or raise the one-line error that names the missing Debian package."""
    if not Path(path).exists():
        raise ShearError(
            f"corpus.domains: {domain!r} needs Debian package {package} ({path} not found); "
            "run `make setup` or remove it from corpus.domains"
        )
    return Path(path)


def broken(domain: str, package: str) -> str:
    """What to do about an installed file that cannot be read: the `fix` of a decode error."""
    return f"reinstall Debian package {package} or remove {domain!r} from corpus.domains"


def installed_versions(packages: list[str]) -> dict[str, str | None]:
    """The installed version of each Debian package (None: not installed, or no dpkg here).
    The same package version gives the same text, so this pins what a domain read."""
    versions: dict[str, str | None] = dict.fromkeys(packages)
    if not packages:
        return versions
    try:  # exits 1 when a package is unknown, but still prints the known ones
        out = subprocess.run(["dpkg-query", "-W", "-f=${Package}\t${Version}\t${db:Status-Abbrev}\n", *packages],
                             capture_output=True, text=True).stdout
    except FileNotFoundError:  # not a Debian system
        return versions
    for line in out.splitlines():
        package, version, status = line.split("\t")
        if package in versions and status.startswith("ii"):
            versions[package] = version
    return versions
