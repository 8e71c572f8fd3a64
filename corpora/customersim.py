"""CustomerSim-style dialogs: customer-service "track my package" conversations with Faker PII and gold spans.

Owns: the dialog generator in the style of Shi et al. 2022 (Selective Differential Privacy for Language
Modeling, NAACL), as used by Paper A. Each dialog is a fresh, fictitious customer: a few ``User: ...`` /
``Agent: ...`` turns drawn from varied templates across five scenarios (tracking, address change, double charge,
payment update, damaged item), so the non-sensitive text is not trivially predictable. About 60-150 tokens per
dialog with a BPE tokenizer such as SmolLM2's.

Privacy unit: one dialog = one customer = one example. Sensitive (gold spans, labels in ``LABELS``): every value
Faker produced about a person — customer and agent names, street addresses, phone numbers, emails, card numbers
(and their last four digits), order and tracking numbers. Products, carriers, depots and days are not personal
and stay non-sensitive; they come from fixed lists so that no Faker name hides inside them.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from faker import Faker

from privtune.corpora.records import Record
from privtune.corpora.textbuild import LazyValues, TextBuilder

LABELS = ("name", "address", "phone", "email", "card", "order_id", "tracking_id")

# Non-sensitive fillers. Fixed lists (not Faker cities) so that no person-like string appears outside a span.
PRODUCTS = (
    "running shoes", "a coffee grinder", "two phone chargers", "a winter jacket", "a standing desk",
    "the headphones", "printer paper", "a yoga mat", "the kitchen scale", "a desk lamp", "mixing bowls",
    "a backpack", "the blender", "a board game", "vitamins", "a laptop sleeve", "a cast iron pan", "bath towels",
    "a bike helmet", "the water filter", "a gaming mouse", "a baby monitor", "rain boots", "a wall clock",
    "a tool kit", "an electric kettle", "a phone case", "garden gloves", "a space heater", "dog food",
)
CARRIERS = {"UPS": "1Z??????########", "FedEx": "############", "USPS": "9400##########",
            "DHL": "##########", "OnTrac": "C##########"}
DEPOTS = ("Memphis", "Louisville", "Indianapolis", "Ontario", "Dallas", "Newark", "Atlanta", "Reno", "Columbus")
DAYS = ("tomorrow", "on Monday", "on Tuesday", "by Wednesday", "on Thursday", "by Friday", "this weekend",
        "later today", "early next week", "in two days")
STATUSES = ("out for delivery", "held at our {depot} depot", "in transit via {depot}",
            "delayed by weather near {depot}", "waiting at the {depot} hub", "marked as delivered")
ORDER_FORMATS = ("##########", "ORD-#######", "W#########", "???-######", "#######-##", "#?#?#####")
PLAIN = frozenset({"product", "carrier", "day", "status"})

GREETINGS = (
    "Agent: Hi, this is {name__agent} from support. How can I help?",
    "Agent: Thanks for contacting us, I'm {name__agent}. What can I do for you?",
    "Agent: Hello! You're chatting with {name__agent}.",
)
OPENINGS = {
    "track": (
        "User: Hi, I ordered {product} last week and it still hasn't shown up.",
        "User: My package was supposed to arrive {day} but tracking hasn't changed.",
        "User: Hey, I'm trying to track my order of {product}.",
        "User: Good morning! Could you check on my delivery?",
        "User: The website just says processing. Where is my package?",
        "User: Where is my order? It's been over a week.",
    ),
    "move": (
        "User: Hi, I'm moving and need to change where {product} gets delivered.",
        "User: Can I still change the shipping address on an order?",
    ),
    "charge": (
        "User: I was charged twice for {product}.",
        "User: Hi, there's a duplicate charge on my statement.",
    ),
    "payment": (
        "User: My card expired, so I need to update the payment on a pending order.",
        "User: The payment for {product} failed and I'd like to use another card.",
    ),
    "damaged": (
        "User: My package came today but {product} inside was broken.",
        "User: Hi, the box was crushed and {product} is damaged.",
    ),
}
ASK_ORDER = (
    "Agent: Happy to help. What's your order number?",
    "Agent: Sorry about that! What's the order number?",
    "Agent: Sure thing. Can I get the order number, please?",
    "Agent: Let me look into it. Do you have the order number?",
)
GIVE_ORDER = ("User: It's {order_id}.", "User: The order number is {order_id}.", "User: Sure, {order_id}.",
              "User: I think it's {order_id}.", "User: Here you go: {order_id}")
# (agent question, user answers): an answer must fit its question.
VERIFY = (
    ("Agent: Thanks. Can you confirm the full name on the account?",
     ("User: {name}.", "User: It's under {name}.")),
    ("Agent: For security, please confirm the email on file.",
     ("User: {email}", "User: It should be {email}.")),
    ("Agent: Could you confirm the phone number on the account?",
     ("User: {phone}", "User: Sure, it's {phone}.")),
    ("Agent: And what's the shipping address?",
     ("User: {address}", "User: It's going to {address}.")),
    ("Agent: Please confirm your name and email.",
     ("User: {name}, and the email is {email}.", "User: Sure, {name}, {email}.")),
)
STATUS = (
    "Agent: Thanks, {name__first}. It shipped with {carrier} and is {status}; tracking {tracking_id}.",
    "Agent: I found it. The package is {status} and should arrive {day}.",
    "Agent: Thank you. The parcel is {status}. The {carrier} reference is {tracking_id}.",
    "Agent: All right, {name__first}, it's {status}. {carrier} expects to deliver it {day}.",
)
CONTACT = (
    ("Agent: Should we text updates to {phone}?",
     ("User: Yes, please.", "User: No, use {phone__alt} instead.")),
    ("Agent: I'll email a confirmation to {email}.",
     ("User: Thanks.", "User: Please use {email__alt} instead.")),
)
CLOSINGS = (
    ("User: Great, thanks for your help!", "Agent: You're welcome, {name__first}!"),
    ("User: Okay, thank you.", "Agent: Happy to help. Have a nice day."),
    ("User: Perfect, that's all I needed.",),
    ("User: Thanks, I'll keep an eye on it.", "Agent: Sounds good. Take care!"),
)


def _track(rng: random.Random) -> list[str]:
    turns = [rng.choice(OPENINGS["track"]), rng.choice(ASK_ORDER), rng.choice(GIVE_ORDER)]
    # At most one of the optional exchanges, so that most dialogs fit into 128 tokens.
    extra = rng.choices((None, VERIFY, CONTACT), weights=(0.4, 0.4, 0.2))[0]
    if extra is VERIFY:
        question, answers = rng.choice(VERIFY)
        turns += [question, rng.choice(answers)]
    turns.append(rng.choice(STATUS))
    if extra is CONTACT:
        question, answers = rng.choice(CONTACT)
        turns += [question, rng.choice(answers)]
    return turns


def _move(rng: random.Random) -> list[str]:
    return [
        rng.choice(OPENINGS["move"]),
        rng.choice(("Agent: Sure. What's the order number?", "Agent: Happy to help. Which order is it?")),
        rng.choice(GIVE_ORDER),
        rng.choice(("Agent: Where should it go instead?", "Agent: Found it. What's the new address?")),
        rng.choice(("User: {address__new}", "User: Please send it to {address__new}.")),
        rng.choice(("Agent: Done, {carrier} will deliver it there {day}.",
                    "Agent: Updated. The new address is {address__new}.")),
    ]


def _charge(rng: random.Random) -> list[str]:
    return [
        rng.choice(OPENINGS["charge"]),
        rng.choice(("Agent: Sorry! What are the last four digits of the card?",
                    "Agent: Let me check. Which card was it, the last four digits?")),
        rng.choice(("User: It ends in {card__last4}.", "User: {card__last4}.")),
        rng.choice(("Agent: I see the duplicate on order {order_id} and refunded it.",
                    "Agent: Thanks, {name__first}. The refund to the card ending {card__last4} takes a few days.")),
    ]


def _payment(rng: random.Random) -> list[str]:
    return [
        rng.choice(OPENINGS["payment"]),
        rng.choice(("Agent: Sure, what card would you like to use?", "Agent: No problem. What's the new card number?")),
        rng.choice(("User: Please use {card}.", "User: The new card is {card}.")),
        rng.choice(("Agent: Saved. Order {order_id} will ship {day}.", "Agent: Thanks, the payment is updated.")),
    ]


def _damaged(rng: random.Random) -> list[str]:
    turns = [rng.choice(OPENINGS["damaged"]), rng.choice(ASK_ORDER), rng.choice(GIVE_ORDER)]
    turns.append("Agent: Sorry! A replacement or a refund?")
    if rng.random() < 0.5:
        turns += ["User: A replacement, please.",
                  "Agent: It ships {day} with {carrier}, tracking number {tracking_id}."]
    else:
        turns += ["User: A refund.", "Agent: Done. You'll get a confirmation at {email}."]
    return turns


SCENARIOS: dict[str, Callable[[random.Random], list[str]]] = {
    "track": _track, "move": _move, "charge": _charge, "payment": _payment, "damaged": _damaged,
}
SCENARIO_WEIGHTS = {"track": 4, "move": 1, "charge": 1, "payment": 1, "damaged": 1}


def _card(fake: Faker, rng: random.Random) -> str:
    number = fake.credit_card_number()
    if rng.random() < 0.5:  # half written in groups of four, as people often type them
        number = " ".join(number[i : i + 4] for i in range(0, len(number), 4))
    return number


def _email(fake: Faker, rng: random.Random, name: str) -> str:
    if rng.random() < 0.5:
        return fake.email()
    first, last = name.lower().split(" ", 1)
    return f"{first}{rng.choice(('.', '_', ''))}{last.replace(' ', '')}{rng.randint(1, 99)}@{fake.free_email_domain()}"


def _values(fake: Faker, rng: random.Random) -> LazyValues:
    """Every field a template may use; each is drawn only if used (a Faker call is slow for what it makes; see
    docs/performance-notes.md)."""
    values: LazyValues
    carrier = rng.choice(sorted(CARRIERS))  # drawn eagerly: the tracking-number format depends on it
    letters = "ABCDEFGHJKLMNPQRSTUVWXYZ"
    values = LazyValues({
        "name": lambda: f"{values['name__first']} {fake.last_name()}",
        "name__first": fake.first_name,
        "name__agent": fake.first_name,
        "address": lambda: fake.address().replace("\n", ", "),
        "address__new": lambda: fake.address().replace("\n", ", "),
        "phone": fake.phone_number,
        "phone__alt": fake.phone_number,
        "email": lambda: _email(fake, rng, values["name"]),
        "email__alt": fake.email,
        "card": lambda: _card(fake, rng),
        "card__last4": lambda: values["card"].replace(" ", "")[-4:],
        "order_id": lambda: fake.bothify(rng.choice(ORDER_FORMATS), letters=letters),
        "tracking_id": lambda: fake.bothify(CARRIERS[carrier], letters=letters + "0123456789"),
        "product": lambda: rng.choice(PRODUCTS),
        "carrier": lambda: carrier,
        "day": lambda: rng.choice(DAYS),
        "status": lambda: rng.choice(STATUSES).format(depot=rng.choice(DEPOTS)),
    })
    return values


def generate_dialog(fake: Faker, rng: random.Random, index: int) -> tuple[Record, dict[str, str]]:
    """One dialog and the field values it used (tests check every gold span against them)."""
    values = _values(fake, rng)
    scenario = rng.choices(list(SCENARIO_WEIGHTS), weights=list(SCENARIO_WEIGHTS.values()))[0]
    turns = SCENARIOS[scenario](rng)
    if rng.random() < 0.2:
        turns.insert(0, rng.choice(GREETINGS))
    closing = rng.choice(CLOSINGS)
    turns += closing if rng.random() < 0.4 else closing[:1]
    builder = TextBuilder()
    for i, turn in enumerate(turns):
        if i:
            builder.add("\n")
        builder.fill(turn, values, plain=PLAIN)
    return Record(id=f"customersim-{index:06d}", text=builder.text, spans=builder.spans), values.drawn


def generate(num_examples: int, *, seed: int) -> list[Record]:
    """``num_examples`` dialogs, identical for identical seeds (own Faker instance and RNG, no global state)."""
    fake = Faker("en_US")
    fake.seed_instance(f"privtune.customersim.faker:{seed}")
    rng = random.Random(f"privtune.customersim:{seed}")
    return [generate_dialog(fake, rng, i)[0] for i in range(num_examples)]
