"""The risk report: receipts by OWASP Agentic Top 10, OWASP NHI Top 10, CSA MAESTRO layer
and NIST AI RMF function over a period, with server-rendered SVG charts (no script).

Counts come from one grouped query over the receipts' risk tags
(:meth:`tether.store.Store.record_tag_counts`). A receipt counts once under every tag it
carries; NIST AI RMF subcategories (``MANAGE-2.4``) are summed into their function
(``MANAGE``). *Findings* are the receipts that refused or held something (deny,
approval required); the rest are controls that worked as intended (allow).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from markupsafe import Markup, escape

ASI = {
    "ASI01": "Agent Goal Hijack",
    "ASI02": "Tool Misuse and Exploitation",
    "ASI03": "Identity and Privilege Abuse",
    "ASI04": "Agentic Supply Chain Vulnerabilities",
    "ASI05": "Unexpected Code Execution",
    "ASI06": "Memory and Context Poisoning",
    "ASI07": "Insecure Inter-Agent Communication",
    "ASI08": "Cascading Failures",
    "ASI09": "Human-Agent Trust Exploitation",
    "ASI10": "Rogue Agents",
}
NHI = {
    "NHI1": "Improper Offboarding",
    "NHI2": "Secret Leakage",
    "NHI3": "Vulnerable Third-Party NHI",
    "NHI4": "Insecure Authentication",
    "NHI5": "Overprivileged NHI",
    "NHI6": "Insecure Cloud Deployment Configurations",
    "NHI7": "Long-Lived Secrets",
    "NHI8": "Environment Isolation",
    "NHI9": "NHI Reuse",
    "NHI10": "Human Use of NHI",
}
MAESTRO = {
    "L1": "Foundation Models",
    "L2": "Data Operations",
    "L3": "Agent Frameworks",
    "L4": "Deployment and Infrastructure",
    "L5": "Evaluation and Observability",
    "L6": "Security and Compliance",
    "L7": "Agent Ecosystem",
}
NIST = {
    "GOVERN": "Govern: policies, accountability, culture",
    "MAP": "Map: context and risks identified",
    "MEASURE": "Measure: risks analysed and tracked",
    "MANAGE": "Manage: risks prioritised and acted on",
}
FRAMEWORKS = (
    ("owasp-asi", "OWASP Top 10 for Agentic Applications", ASI),
    ("owasp-nhi", "OWASP Non-Human Identities Top 10", NHI),
    ("maestro", "CSA MAESTRO layer", MAESTRO),
    ("nist-ai-rmf", "NIST AI RMF function", NIST),
)


@dataclass
class Row:
    key: str
    name: str
    tag: str
    allow: int = 0
    deny: int = 0
    approval: int = 0
    accepted: list[str] = field(default_factory=list)  # titles of accepted risks in force

    @property
    def total(self) -> int:
        return self.allow + self.deny + self.approval

    @property
    def findings(self) -> int:
        return self.deny + self.approval


@dataclass
class Section:
    prefix: str
    title: str
    rows: list[Row]

    @property
    def chart(self) -> Markup:
        return bar_chart(self.rows)


def tag_key(tag: str) -> tuple[str, str]:
    """``('nist-ai-rmf', 'MANAGE')`` for ``nist-ai-rmf:MANAGE-2.4``, and so on."""
    prefix, _, key = tag.partition(":")
    if prefix == "nist-ai-rmf":
        key = key.split("-", 1)[0]
    return prefix, key


def build(counts: list[tuple[str, str, int]], accepted: dict[str, list[str]]) -> list[Section]:
    """Sections of the report from (tag, effect, count) and the accepted risks in force
    by tag (an accepted NIST subcategory shows under its function)."""
    sections = []
    for prefix, title, names in FRAMEWORKS:
        rows = {key: Row(key, name, f"{prefix}:{key}") for key, name in names.items()}
        for tag, effect, count in counts:
            p, key = tag_key(tag)
            if p != prefix or key not in rows:
                continue
            row = rows[key]
            if effect == "deny":
                row.deny += count
            elif effect == "approval_required":
                row.approval += count
            else:
                row.allow += count
        for tag, titles in accepted.items():
            p, key = tag_key(tag)
            if p == prefix and key in rows:
                rows[key].accepted.extend(titles)
        sections.append(Section(prefix, title, list(rows.values())))
    return sections


#: Characters of a row's label that fit the chart's label column (11 px text, 230 px).
LABEL_CHARS = 34


def _shorten(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters at a word boundary, ending with an ellipsis."""
    cut = text[: limit - 1]
    if " " in cut[limit // 2 :]:
        cut = cut[: cut.rindex(" ")]
    return cut.rstrip(" ,;:-") + "…"


def bar_chart(rows: list[Row]) -> Markup:
    """A horizontal stacked bar chart (allow, approval, deny) as inline SVG. Colours come
    from the stylesheet (classes), so the strict style policy holds and it prints."""
    label_w, bar_w, row_h = 230, 420, 22
    height = row_h * len(rows) + 30
    top = max([r.total for r in rows] + [1])
    parts = [
        f'<svg class="chart" viewBox="0 0 {label_w + bar_w + 70} {height}" role="img" '
        f'xmlns="http://www.w3.org/2000/svg">'
    ]
    for i, row in enumerate(rows):
        y = 4 + i * row_h
        full = f"{row.key} {row.name}"
        # What fits the label column, cut at a word with an ellipsis; the whole label is
        # the element's title (shown on hover, read by screen readers) and in the table.
        short = full if len(full) <= LABEL_CHARS else _shorten(full, LABEL_CHARS)
        parts.append(
            f'<text class="chart-label" x="0" y="{y + 14}"><title>{escape(full)}</title>'
            f"{escape(short)}</text>"
        )
        x = float(label_w)
        for css, value in (("allow", row.allow), ("approval", row.approval), ("deny", row.deny)):
            if value:
                w = max(bar_w * value / top, 1.0)
                parts.append(
                    f'<rect class="bar-{css}" x="{x:.1f}" y="{y + 3}" width="{w:.1f}" '
                    f'height="{row_h - 6}"><title>{escape(row.key)} {css}: {value}</title></rect>'
                )
                x += w
        parts.append(f'<text class="chart-value" x="{x + 6:.1f}" y="{y + 14}">{row.total}</text>')
    legend_y = height - 8
    for j, (css, word) in enumerate(
        (("allow", "allowed"), ("approval", "held for approval"), ("deny", "denied"))
    ):
        lx = label_w + j * 140
        parts.append(
            f'<rect class="bar-{css}" x="{lx}" y="{legend_y - 10}" width="12" height="12"/>'
            f'<text class="chart-label" x="{lx + 16}" y="{legend_y}">{word}</text>'
        )
    parts.append("</svg>")
    return Markup("".join(parts))  # noqa: S704 - every interpolated text is escaped above
