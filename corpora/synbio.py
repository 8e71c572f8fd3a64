"""SynBio: synthetic biographies of fictitious people, every attribute a gold sensitive span.

Owns: the biography generator used by Paper A's SynBio dataset (in the spirit of the "bioS" data of Allen-Zhu
and Li). A biography opens with the person's name, then states each attribute in one sentence picked from several
templates, in a shuffled order, referring to the person by pronoun or first name.

Privacy unit: one biography = one person = one example. Sensitive (gold spans, labels in ``LABELS``): the name
(full and first), birth date, birth city, university, major, employer, job title and current city. Pronouns and
template words are not sensitive.
"""

from __future__ import annotations

import random

from faker import Faker

from privtune.corpora.records import Record
from privtune.corpora.textbuild import LazyValues, TextBuilder

LABELS = ("name", "birth_date", "birth_city", "university", "major", "employer", "job", "city")

MAJORS = (
    "Computer Science", "Mechanical Engineering", "Biology", "Economics", "History", "Mathematics", "Chemistry",
    "Psychology", "Philosophy", "Nursing", "Architecture", "Linguistics", "Political Science", "Physics",
    "Accounting", "Music", "Civil Engineering", "Marine Biology", "Statistics", "Journalism", "Art History",
)
UNIVERSITY_FORMS = ("University of {}", "{} University", "{} College", "{} Institute of Technology",
                    "{} State University")
DATE_FORMATS = ("%B %d, %Y", "%d %B %Y", "%Y-%m-%d", "%m/%d/%Y", "%b %d, %Y")

OPENINGS = (
    "{name} was born on {birth_date} in {birth_city}.",
    "{name} is {a} {job} who was born in {birth_city} on {birth_date}.",
    "Born on {birth_date}, {name} grew up in {birth_city}.",
    "{name} came into the world in {birth_city} on {birth_date}.",
    "This is the story of {name}.",
)
# Attribute sentences; {who} is a pronoun or the first name, {Who} the same capitalised.
SENTENCES = {
    "birth": (
        "{Who} was born in {birth_city} on {birth_date}.",
        "{Who} spent {their} early years in {birth_city}, having been born on {birth_date}.",
        "{Their} birthday is {birth_date}, and {who} is originally from {birth_city}.",
    ),
    "study": (
        "{Who} studied {major} at {university}.",
        "{Who} graduated from {university} with a degree in {major}.",
        "At {university}, {who} majored in {major}.",
        "{Their} degree in {major} comes from {university}.",
    ),
    "work": (
        "{Who} works for {employer} as {a} {job}.",
        "Today {who} is employed at {employer}, where {who} is {a} {job}.",
        "{Who} joined {employer} and now works as {a} {job}.",
        "{Their} employer is {employer}; {their} title there is {job}.",
    ),
    "city": (
        "{Who} currently lives in {city}.",
        "These days {who} calls {city} home.",
        "{Who} moved to {city} a few years ago.",
    ),
}
# Singular pronouns only: "they" would need verb agreement in every template.
PRONOUNS = {"female": ("she", "her"), "male": ("he", "his")}
PLAIN = frozenset({"a"})


def _job_title(job: str) -> str:
    """Faker's "Engineer, civil" -> "engineer"; lower-case the first letter unless it starts an acronym."""
    title = job.split(",")[0]
    return title[0].lower() + title[1:] if title[1:2].islower() else title


def _person(fake: Faker, rng: random.Random) -> tuple[LazyValues, str]:
    gender = rng.choice(("female", "male"))
    first = fake.first_name_female() if gender == "female" else fake.first_name_male()
    values: LazyValues
    values = LazyValues({
        "name": lambda: f"{first} {fake.last_name()}",
        "name__first": lambda: first,
        "birth_date": lambda: fake.date_of_birth(minimum_age=18, maximum_age=90).strftime(rng.choice(DATE_FORMATS)),
        "birth_city": fake.city,
        "university": lambda: rng.choice(UNIVERSITY_FORMS).format(rng.choice((fake.last_name, fake.city))()),
        "major": lambda: rng.choice(MAJORS),
        "employer": fake.company,
        "job": lambda: _job_title(fake.job()),
        "a": lambda: "an" if values["job"][0] in "aeiouAEIOU" else "a",  # the article, not sensitive
        "city": fake.city,
    })
    return values, gender


def _refer(template: str, gender: str, rng: random.Random) -> str:
    """Replace {who}/{their} by a pronoun or by the (sensitive) first name, chosen per sentence."""
    subject, possessive = PRONOUNS[gender]
    if rng.random() < 0.4:
        template = template.replace("{Who}", "{name__first}").replace("{Their}", "{name__first}'s")
        template = template.replace("{who}", "{name__first}").replace("{their}", "{name__first}'s")
    return (template.replace("{Who}", subject.capitalize()).replace("{who}", subject)
            .replace("{Their}", possessive.capitalize()).replace("{their}", possessive))


def generate_bio(fake: Faker, rng: random.Random, index: int) -> tuple[Record, dict[str, str]]:
    """One biography and the field values it used (tests check every gold span against them)."""
    values, gender = _person(fake, rng)
    opening = rng.choice(OPENINGS)
    topics = [t for t in SENTENCES if not (t == "birth" and "{birth_date}" in opening)]
    rng.shuffle(topics)
    builder = TextBuilder()
    builder.fill(opening, values, plain=PLAIN)
    for topic in topics:
        builder.add(" ")
        builder.fill(_refer(rng.choice(SENTENCES[topic]), gender, rng), values, plain=PLAIN)
    return Record(id=f"synbio-{index:06d}", text=builder.text, spans=builder.spans), values.drawn


def generate(num_examples: int, *, seed: int) -> list[Record]:
    """``num_examples`` biographies, identical for identical seeds (own Faker instance and RNG)."""
    fake = Faker("en_US")
    fake.seed_instance(f"privtune.synbio.faker:{seed}")
    rng = random.Random(f"privtune.synbio:{seed}")
    return [generate_bio(fake, rng, i)[0] for i in range(num_examples)]
