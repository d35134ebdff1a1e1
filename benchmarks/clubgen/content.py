"""One version's bytes: tarball members, screenshots, README assets and DB text.

The README exists twice, as in club: the tarball holds the author's file with relative
image paths, and ``readme_content`` holds it rewritten to ``/api/packages/<pkg>/versions/
<ver>/{readme-assets,screenshots}/<i>.<ext>`` URLs (§1.5), which is what an offline
consistency check follows to the blobs.
"""

from __future__ import annotations

import json
import random

from . import media, text
from .archive import build_tarball
from .model import CLUB_ORIGIN, BuiltVersion, Carry, Dep, VersionSpec
from .rand import lognormal_int, sha256_hex

DART_RATIO = 3.2  # measured deflate ratio of text.dart_source output
TEXT_RATIO = 3.3
SHOT_CARRY = 0.85
ASSET_CARRY = 0.8
CHANGELOG_CAP = 256 * 1024
_IMAGES = "\x00images\x00"  # where the image block goes; rendered per destination
_LICENSE = "MIT License\n\nCopyright (c) 2024 ACME Corp.\n\n" + "Permission is hereby granted, free of charge. " * 12


def build_version(spec: VersionSpec, carry: Carry) -> BuiltVersion:
    """Build every byte of a version from its spec and the previous version's carry."""
    rng = random.Random(spec.seed)
    shots = _carried(rng, carry.shots, [ext for _, ext in spec.shots], SHOT_CARRY, spec.image_scale, True)
    assets = _carried(rng, carry.assets, list(spec.asset_exts), ASSET_CARRY, spec.image_scale, False)
    pubspec = pubspec_dict(spec)
    readme_body = _readme_body(rng, spec)
    changelog = (_changelog_entry(rng, spec.version) + carry.changelog)[:CHANGELOG_CAP]
    example = text.dart_source(rng, lognormal_int(rng, 1500, 0.8, 100, 5000)) if spec.has_example else None
    members = _members(rng, spec, pubspec, _readme(spec, readme_body, False), changelog, example)
    tarball = build_tarball(members)
    shots_json = [_shot_entry(path, data) for (path, _), data in zip(spec.shots, shots)]
    return BuiltVersion(
        tarball=tarball, shots=shots, assets=assets, pubspec_json=_json(pubspec),
        readme=_readme(spec, readme_body, True), changelog=changelog,
        example_path="example/main.dart" if example is not None else None, example_content=example,
        screenshots_json=_json(shots_json), sha256=sha256_hex(tarball), size=len(tarball),
    )


def _json(value: object) -> str:
    return json.dumps(value, separators=(",", ":"))


def _carried(rng: random.Random, previous: list[bytes], exts: list[str], keep: float,
             scale: float, screenshot: bool) -> list[bytes]:
    """Per index: the previous bytes with probability ``keep``, else a fresh file."""
    out = []
    for index, ext in enumerate(exts):
        if index < len(previous) and rng.random() < keep:
            out.append(previous[index])
            continue
        size = media.screenshot_size(rng, ext, scale) if screenshot else media.asset_size(rng, scale)
        out.append(media.fake_file(rng, ext, size))
    return out


def _shot_entry(path: str, data: bytes) -> dict[str, object]:
    ext = path.rsplit(".", 1)[-1]
    return {"path": path, "description": _shot_description(path),
            "sizeBytes": len(data), "sha256": sha256_hex(data), "mimeType": media.SCREENSHOT_MIMES[ext]}


def _shot_description(path: str) -> str:
    return f"{path.rsplit('/', 1)[-1].split('.')[0]} screen"


def pubspec_dict(spec: VersionSpec) -> dict[str, object]:
    """The pubspec as club parses it (and stores as ``pubspec_json``)."""
    env: dict[str, object] = {"sdk": ">=3.0.0 <4.0.0"}
    if spec.flutter:
        env["flutter"] = ">=3.10.0"
    out: dict[str, object] = {
        "name": spec.package, "description": spec.description, "version": spec.version,
        "repository": f"https://git.acme.dev/mobile/{spec.package}", "publish_to": CLUB_ORIGIN,
        "environment": env,
    }
    for kind, key in (("direct", "dependencies"), ("dev", "dev_dependencies"), ("override", "dependency_overrides")):
        section = {d.name: _dep_value(d) for d in spec.deps if d.kind == kind}
        if section:
            out[key] = section
    if spec.topics:
        out["topics"] = list(spec.topics)
    if spec.executables:
        out["executables"] = {name: None for name in spec.executables}
    if spec.shots:
        out["screenshots"] = [{"description": _shot_description(p), "path": p} for p, _ in spec.shots]
    return out


def _dep_value(dep: Dep) -> object:
    if dep.source == "hosted":
        return {"hosted": dep.hosted_origin, "version": dep.constraint}
    if dep.source == "sdk":
        return {"sdk": "flutter"}
    if dep.source == "path":
        return {"path": f"../{dep.name}"}
    if dep.source == "git":
        return {"git": {"url": f"https://git.acme.dev/shared/{dep.name}.git", "ref": "main"}}
    return dep.constraint


def _readme_body(rng: random.Random, spec: VersionSpec) -> list[str]:
    """README blocks; the image block is a placeholder rendered per destination."""
    target = lognormal_int(rng, 5000, 0.6, 1500, 60_000)
    return [
        f"# {spec.package}\n\n{spec.description}\n",
        f"[![version]({CLUB_ORIGIN}/api/packages/{spec.package}/badge.svg)]({CLUB_ORIGIN}/packages/{spec.package})\n",
        "## Features\n\n" + "\n".join(f"- {s}" for s in text.prose(rng, target // 5).split(". ")) + "\n",
        _IMAGES,
        f"## Getting started\n\n```yaml\ndependencies:\n  {spec.package}:\n    hosted: {CLUB_ORIGIN}\n"
        f"    version: ^{spec.version}\n```\n",
        "## Usage\n\n```dart\n" + text.dart_source(rng, target * 2 // 5) + "```\n",
        "## Additional information\n\n" + text.prose(rng, target // 5) + "\n",
    ]


def _readme(spec: VersionSpec, blocks: list[str], rewritten: bool) -> str:
    base = f"/api/packages/{spec.package}/versions/{spec.version}"
    lines = [f"![screenshot {i}]({f'{base}/screenshots/{i}.{ext}' if rewritten else path})"
             for i, (path, ext) in enumerate(spec.shots)]
    lines += [f"![demo {i}]({f'{base}/readme-assets/{i}.{ext}' if rewritten else f'doc/demo_{i}.{ext}'})"
              for i, ext in enumerate(spec.asset_exts)]
    images = "## Screenshots\n\n" + "\n".join(lines) + "\n" if lines else ""
    parts = [images if block == _IMAGES else block for block in blocks]
    return "\n".join(part for part in parts if part)


def _changelog_entry(rng: random.Random, version: str) -> str:
    """150 to 400 bytes per version, newest first (the changelog is cumulative)."""
    items = text.prose(rng, rng.randint(110, 340)).split(". ")
    return f"## {version}\n\n" + "\n".join(f"- {item.rstrip('.')}." for item in items if item) + "\n\n"


def _members(rng: random.Random, spec: VersionSpec, pubspec: dict[str, object], readme: str,
             changelog: str, example: str | None) -> list[tuple[str, bytes]]:
    """Tarball members; lib/src/ source fills whatever the size target leaves."""
    fixed = [("pubspec.yaml", to_yaml(pubspec).encode()), ("README.md", readme.encode()),
             ("CHANGELOG.md", changelog.encode()), ("LICENSE", _LICENSE.encode()),
             ("analysis_options.yaml", b"include: package:lints/recommended.yaml\n")]
    if example is not None:
        fixed.append(("example/main.dart", example.encode()))
    fixed += [(f"bin/{name}.dart", text.dart_source(rng, 600).encode()) for name in spec.executables]
    estimate = sum(len(data) for _, data in fixed) / TEXT_RATIO + 400 * len(fixed)
    code_bytes = max(1200, int((spec.tar_bytes - estimate) * DART_RATIO))
    return fixed + _lib_files(rng, spec, code_bytes) + _heavy_assets(rng, spec.heavy_bytes)


def _lib_files(rng: random.Random, spec: VersionSpec, code_bytes: int) -> list[tuple[str, bytes]]:
    exports = "".join(f"export 'src/{lib.removesuffix('.dart')}_impl.dart';\n" for lib in spec.libraries)
    files = [(f"lib/{lib}", f"library;\n\n{exports}".encode()) for lib in spec.libraries]
    count = max(1, min(40, code_bytes // 12_000))
    names = [f"lib/src/{lib.removesuffix('.dart')}_impl.dart" for lib in spec.libraries]
    names += [f"lib/src/{w}.dart" for w in text.words(rng, max(0, count - len(names)))]
    per_file = max(300, code_bytes // len(names))
    return files + [(name, text.dart_source(rng, per_file).encode()) for name in names]


def _heavy_assets(rng: random.Random, total: int) -> list[tuple[str, bytes]]:
    """Incompressible fonts and images for the asset-heavy tail (§6.3)."""
    out: list[tuple[str, bytes]] = []
    index = 0
    while total > 0:
        size = min(total, 4 << 20)
        kind = "fonts" if index % 3 == 0 else "images"
        ext = "ttf" if kind == "fonts" else "png"
        out.append((f"assets/{kind}/asset_{index}.{ext}", media.fake_file(rng, ext, size)))
        total -= size
        index += 1
    return out


def to_yaml(value: dict[str, object], indent: int = 0) -> str:
    """A small YAML emitter, enough for the pubspec shapes generated here."""
    pad = " " * indent
    lines = []
    for key, val in value.items():
        if isinstance(val, dict):
            lines.append(f"{pad}{key}:\n" + to_yaml(val, indent + 2))
        elif isinstance(val, list):
            lines.append(f"{pad}{key}:\n" + "".join(_yaml_item(item, indent + 2) for item in val))
        else:
            lines.append(f"{pad}{key}:" + ("" if val is None else f" {_scalar(val)}") + "\n")
    return "".join(lines)


def _yaml_item(item: object, indent: int) -> str:
    pad = " " * indent
    if not isinstance(item, dict):
        return f"{pad}- {_scalar(item)}\n"
    body = to_yaml(item, indent + 2)
    return f"{pad}- " + body[indent + 2:]


def _scalar(value: object) -> str:
    textual = str(value)
    plain = textual.replace("_", "").replace("-", "").replace(".", "").replace("/", "").isalnum()
    return textual if plain else json.dumps(textual)
