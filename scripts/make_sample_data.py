"""Write ftq's bundled sample dataset, ``plugins/data/sample.txt``.

The text is generated here, from templates and word lists written for ftq, so
the project ships no third-party text.  It reads like the daily log of a small
river weather station: regular enough that a short fine-tune visibly lowers
held-out loss, varied enough that the model must learn the patterns rather
than memorise lines.  Deterministic: the same seed writes the same file.

    python scripts/make_sample_data.py
"""

from __future__ import annotations

import random
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "plugins" / "data" / "sample.txt"

STATIONS = ["Alder Ford", "Birch Landing", "Cedar Bend", "Dunmore Weir", "Elm Crossing", "Fallow Mill"]
OBSERVERS = ["Ada", "Bram", "Cleo", "Dara", "Emil", "Freya", "Gus", "Hana"]
MONTHS = ["March", "April", "May", "June", "July", "August", "September", "October"]
SKIES = ["clear", "overcast", "hazy", "patchy cloud", "low fog", "light rain", "steady rain", "a passing shower"]
WINDS = ["north", "north-east", "east", "south-east", "south", "south-west", "west", "north-west"]
BIRDS = ["two herons", "a kingfisher", "a pair of swans", "a flock of starlings", "three cormorants", "a wagtail", "no birds"]
TASKS = [
    "cleaned the rain gauge funnel",
    "replaced the thermometer shield screw",
    "cleared weed from the intake grate",
    "re-levelled the staff gauge",
    "oiled the gate hinge",
    "changed the logger battery",
    "painted the depth marks",
    "swept the hut floor",
]
ISSUES = [
    "the east fence needs a new post",
    "the logger clock runs two minutes fast",
    "moss is growing on the gauge board",
    "the footbridge plank is loose",
    "the boat chain has rusted",
    "nothing needs attention",
]


def entry(rng: random.Random, number: int) -> str:
    station = rng.choice(STATIONS)
    day = rng.randint(1, 28)
    month = rng.choice(MONTHS)
    sky = rng.choice(SKIES)
    wind = rng.choice(WINDS)
    speed = rng.randint(2, 30)
    low = rng.randint(-2, 14)
    high = low + rng.randint(3, 12)
    level = rng.randint(80, 420) / 100
    change = rng.randint(-25, 25) / 100
    rain = rng.choice([0.0, 0.0, 0.2, 0.8, 1.6, 3.4, 7.5, 12.0])
    trend = "up" if change > 0 else "down" if change < 0 else "unchanged"
    delta = f"{trend} {abs(change):.2f} from yesterday" if change else "unchanged from yesterday"
    lines = [
        f"Log {number}, {station}, {day} {month}.",
        f"Sky: {sky}. Wind from the {wind} at {speed} knots.",
        f"Air temperature between {low} and {high} degrees. Rainfall {rain:.1f} millimetres.",
        f"River level {level:.2f} metres, {delta}.",
    ]
    if level > 3.5:
        lines.append("Level is above the warning mark; the lower path is closed.")
    elif rain > 5:
        lines.append("Heavy rain upstream; expect the level to rise tomorrow.")
    lines.append(f"Seen on the water: {rng.choice(BIRDS)}.")
    lines.append(f"Work done: {rng.choice(TASKS)}. Note: {rng.choice(ISSUES)}.")
    lines.append(f"Observer: {rng.choice(OBSERVERS)}.")
    return "\n".join(lines)


def main(count: int = 400, seed: int = 7) -> None:
    rng = random.Random(seed)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("\n\n".join(entry(rng, n + 1) for n in range(count)) + "\n", encoding="utf-8")
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
