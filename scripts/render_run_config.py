"""Print the [tool.flwr.app.config] table from AppConfig's defaults and help texts.

The dataclass defaults are the truth; pyproject.toml repeats them, and tests/test_config.py checks that
the two agree. Run this after adding a config field and paste its output into pyproject.toml.
"""

from dataclasses import fields

from fedrag_app.config.app_config import SECTIONS
from fedrag_app.config.values import toml_value


def render() -> str:
    lines = ["[tool.flwr.app.config]"]
    for section, cls in SECTIONS.items():
        lines.append(f"# --- {section}: {cls.__doc__.strip().splitlines()[0]}")
        for f in fields(cls):
            value = f.default
            if isinstance(value, tuple):
                value = ",".join(value)
            key = f"{section}.{f.name.replace('_', '-')}"
            lines.append(f"# {f.metadata['help']}")
            lines.append(f"{key} = {toml_value(value, key)}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(render())
