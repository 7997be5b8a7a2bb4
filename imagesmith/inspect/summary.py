"""`imagesmith summary`: what an image would be, with nothing built."""

from __future__ import annotations

from pathlib import Path

from imagesmith.config.layout import plan_disk_layout
from imagesmith.config.settings import AUTO_SIZE, SETTINGS, format_size, redacted
from imagesmith.config.space import ResolvedImage
from imagesmith.formats import output_path
from imagesmith.host.aptsources import archive_mirror

DISK_ONLY_SETTINGS = {
    "size", "esp_size", "filesystem", "firmware", "kernel_cmdline", "serial_console", "network",
    "secure_boot",
}  # fmt: skip


def summary_lines(image: ResolvedImage) -> list[str]:
    s = image.settings
    lines = [f"image {image.name}" + (f": {image.description}" if image.description else "")]
    target = image.target
    if target == "disk":
        lines.append(f"  target: disk, booting under {' and '.join(s.boot_firmware)}")
    else:
        lines.append("  target: container")
    lines.append("  classes (in order, last wins; targets each applies to):")
    applied = {c.name for c in image.classes}
    for cls in [*image.classes, *image.skipped_classes]:
        origin = "built-in" if cls.builtin else str(cls.path)
        if cls.extends:
            origin += " (extends built-in)"
        if cls.switched_by:
            value = getattr(s, cls.switched_by)
            shown = "true" if value is True else f'"{value}"'
            origin += f" (added by {cls.switched_by} = {shown})"
        targets = "/".join(cls.effective_targets)
        state = "" if cls.name in applied else f"  -- skipped: not for a {target} image"
        lines.append(f"    {cls.name:<18} {targets:<15} {origin}{state}")
    lines.append("  settings:")
    for setting in SETTINGS:
        only_for = "container" if setting.name.startswith("container_") else ""
        if setting.name in DISK_ONLY_SETTINGS:
            only_for = "disk"
        if only_for and only_for != target:
            continue
        value = redacted(setting.name, getattr(s, setting.name))
        if setting.name == "size" and value == AUTO_SIZE:
            value = "auto (the tree's content plus headroom)"
        elif setting.kind == "size":
            value = format_size(value)
        elif isinstance(value, bool):
            value = "true" if value else "false"
        elif isinstance(value, tuple):
            value = " ".join(value) or "-"
        elif setting.name == "uuid_seed" and not value:
            value = "- (new random UUIDs every build)"
        elif setting.name == "mirror" and not value:
            value = f"{archive_mirror(image.settings.mirror)} (from the build host's apt sources)"
        lines.append(f"    {setting.name:<18} {value}")
    lines.append(f"  packages ({len(image.packages)}): {' '.join(image.packages)}")
    if image.recommends:
        lines.append(f"  with their Recommends: {' '.join(image.recommends)}")
    if image.remove_packages:
        lines.append(f"  removed packages: {' '.join(image.remove_packages)}")
    for repo in image.repositories:
        lines.append(f"  repository {repo.name}: {repo.uri} {' '.join(repo.suites)}")
    if target == "disk":
        layout = plan_disk_layout(
            size=s.size or 4 * 1024**3,
            esp_size=s.esp_size,
            filesystem=s.filesystem,
            architecture=s.architecture,
            firmware=s.boot_firmware,
        )
        lines.append(f"  disk: GPT, {format_size(s.size) if s.size else 'sized at assembly'}")
        for p in layout.partitions:
            lines.append(
                f"    {p.number}  {p.name:<5} {p.filesystem or '-':<6} "
                f"start {format_size(p.start):>8}  size {format_size(p.size):>9}  "
                f"label {p.label or '-'}"
            )
    files = [output_path(Path("."), image.name, fmt).name for fmt in [*s.outputs, "manifest"]]
    lines.append(f"  outputs: {', '.join(files)}")
    return lines


def print_summary(image: ResolvedImage) -> None:
    print("\n".join(summary_lines(image)))
