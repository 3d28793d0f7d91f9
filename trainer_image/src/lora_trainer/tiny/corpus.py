"""Seeded synthetic customer-service conversations.

Two reply styles share one vocabulary. The *casual* style is what the base model is
pre-trained on. The *ticket* style is the fine-tuning target: a fixed structure (ticket
number, label, greeting, one action sentence, a follow-up promise, a sign-off) that never
occurs in pre-training, although its words do. Every slot of a ticket reply (name, order
number, product, store...) can be read off the conversation. The base model's pre-training
is too short to learn copying, so a fine-tuned model gets the structure and the intent label
right and many slots wrong: eval loss, BLEU and ROUGE-L move by a clear margin, yet stay far
from perfect, like a real fine-tune.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from enum import Enum

# One chat turn, {"role": "system" | "user" | "assistant", "content": str}, in the field
# report's `conversations` format (a plain dict, as transformers' chat templates take it).
Message = dict[str, str]
Conversation = list[Message]


PRETRAIN_CONVERSATIONS = 4000
TRAIN_SAMPLES = 640
EVAL_SAMPLES = 64
PRETRAIN_MULTI_TURN = 0.2
FINETUNE_MULTI_TURN = 0.15


class ReplyStyle(Enum):
    """Which assistant style a conversation uses."""

    CASUAL = "casual"
    TICKET = "ticket"


NAMES = (
    "Alice", "Ben", "Carla", "David", "Elena", "Farid", "Grace", "Hugo", "Ines", "Jonas",
    "Keiko", "Liam", "Maya", "Nina", "Omar", "Priya", "Quinn", "Rosa", "Sam", "Tara",
)  # fmt: skip
PRODUCTS = (
    "wireless headphones", "coffee grinder", "desk lamp", "running shoes", "phone case",
    "water bottle", "backpack", "yoga mat", "kettle", "keyboard", "blender", "winter jacket",
    "camera bag", "toaster", "bike helmet", "travel mug",
)  # fmt: skip
CITIES = (
    "Austin", "Boston", "Denver", "Leeds", "Lyon", "Madrid", "Oslo", "Porto", "Seattle",
    "Toronto", "Vienna", "Zurich",
)  # fmt: skip
CARRIERS = ("UPS", "DHL", "FedEx", "the postal service")
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday")
STORES = ("Northwind", "Bluebird Goods", "Cedar Market", "Lumen Shop", "Harbor Supply")

SYSTEM_PROMPTS = (
    "You are a helpful customer service assistant for {store}.",
    "You are the support agent of {store}, an online shop. Be polite and brief.",
    "You answer customer questions for {store}.",
)
OPENERS = ("Hi, this is {name}.", "Hello, my name is {name}.", "Hi there, {name} here.")
FOLLOW_UPS = ("Thanks. One more thing:", "Great, thank you. Also,", "OK. Another question:")
CASUAL_GREETING_PROBABILITY = 0.6
CASUAL_CLOSING_PROBABILITY = 0.4
# Casual replies often repeat the customer's details: that is how the base model learns to
# copy names and numbers from the conversation, which the ticket style relies on.
CASUAL_GREETINGS = (
    "Hi {name}.",
    "Thanks for writing, {name}.",
    "Hello {name}, thanks for your message.",
    "Order {order}, got it.",
    "Thanks, I see order {order} for the {product}.",
    "Hi {name}, this is {store} support.",
)
# Optional last sentences of casual replies. They put the ticket style's words into the base
# corpus in other sentences, as a real base model knows the words but not the ticket format.
CASUAL_CLOSINGS = (
    "Kind regards, and thank you for your patience.",
    "I have opened a ticket for this, and it is under review.",
    "Our care team will follow up if anything changes.",
    "A missing parcel claim or a replacement can be requested by email.",
    "If you need a prepaid return label, it can be attached to an email.",
    "The carrier has traced the package, and it is being checked.",
    "Your billing issue has been flagged for our team.",
    "A price adjustment or a refund for a duplicate charge is always possible.",
    "An address change or a cancellation can be updated in your account.",
    "A password reset link can be sent to the email of your account.",
    "Dear customer, your order status will be updated within 24 hours.",
    "Damaged item reports have priority for us.",
)


@dataclass(frozen=True)
class Intent:
    """Templates of one customer request type.

    `ticket_action` may only use slots that every `requests` template mentions.
    """

    label: str
    requests: tuple[str, ...]
    casual: tuple[str, ...]
    ticket_action: str


INTENTS = (
    Intent(
        "order status",
        (
            "Where is my order {order}? I bought a {product} and it has not arrived.",
            "Can you tell me the status of order {order}? It is a {product}.",
            "My {product} from order {order} is late. When will it come?",
        ),
        (
            "Sorry for the wait, {name}. Order {order} left our warehouse and {carrier} "
            "will deliver it on {day}.",
            "Thanks for asking. Your {product} is on the way with {carrier} and should "
            "arrive by {day}.",
            "I checked order {order} for you. It is in transit and should arrive on {day}.",
        ),
        "Your {product} from order {order} is being traced with the carrier.",
    ),
    Intent(
        "refund request",
        (
            "I want a refund for the {product} in order {order}.",
            "Please refund order {order}. The {product} did not work for me.",
            "Can I get my money back for the {product}? The order number is {order}.",
        ),
        (
            "No problem, {name}. I started a refund of {amount} for order {order}. It takes "
            "3 to 5 days.",
            "I am sorry the {product} did not work out. The refund for order {order} is on "
            "its way.",
            "Sure, I can help. Once we receive the {product}, we will refund {amount} to "
            "your card.",
        ),
        "A refund for the {product} from order {order} has been opened.",
    ),
    Intent(
        "return",
        (
            "I would like to return the {product} from order {order}.",
            "How do I send back the {product}? Order {order}.",
            "The {product} is the wrong size. Can I return it? Order {order}.",
        ),
        (
            "Of course, {name}. Pack the {product} in its box and drop it at any {carrier} "
            "point.",
            "You can return it within 30 days. I emailed you a label for order {order}.",
            "Sure. Please send the {product} back and we will take care of the rest.",
        ),
        "A prepaid return label for the {product} from order {order} is attached.",
    ),
    Intent(
        "cancellation",
        (
            "Please cancel order {order}. I ordered the {product} by mistake.",
            "Can I still cancel my order {order} for a {product}?",
            "I no longer need the {product}. Cancel order {order}, please.",
        ),
        (
            "Done, {name}. Order {order} is cancelled and you will not be charged.",
            "Good timing. The {product} had not shipped yet, so I cancelled order {order}.",
            "I am sorry, order {order} already left with {carrier}. You can return it "
            "when it arrives.",
        ),
        "Order {order} for the {product} has been flagged for cancellation.",
    ),
    Intent(
        "address change",
        (
            "I moved to {city}. Can you change the address on order {order}?",
            "Please ship order {order} to my new address in {city}.",
            "Can order {order} go to {city} instead? It is a {product}.",
        ),
        (
            "Sure, {name}. I updated order {order}, it will now go to {city}.",
            "No problem. {carrier} will bring the package to {city} on {day}.",
            "I changed the address. Your order will arrive in {city} by {day}.",
        ),
        "The delivery address of order {order} will be updated to {city}.",
    ),
    Intent(
        "damaged item",
        (
            "My {product} arrived broken. The order is {order}.",
            "The box for order {order} was crushed and the {product} is damaged.",
            "The {product} from order {order} came with a crack.",
        ),
        (
            "I am so sorry, {name}. We will send you a new {product} right away.",
            "That should not happen. Please keep the box, and I will ship a new one on {day}.",
            "Sorry about that. I can refund {amount} or send a new {product}, whichever "
            "you prefer.",
        ),
        "A free replacement {product} for order {order} has been requested.",
    ),
    Intent(
        "missing parcel",
        (
            "Order {order} says delivered but I never got the {product}.",
            "The tracking shows order {order} was delivered, but there is no {product}.",
            "I cannot find my {product}. The app says order {order} was delivered.",
        ),
        (
            "Sorry, {name}. Please check with your neighbours first. I asked {carrier} to "
            "look into it.",
            "I see that {carrier} marked it delivered on {day}. I will open a search.",
            "That is frustrating. If it does not turn up by {day}, we will send a new one.",
        ),
        "A missing parcel claim for order {order} has been filed.",
    ),
    Intent(
        "password reset",
        (
            "I forgot my password and cannot log in. My customer number is {order}.",
            "How do I reset my password? I am locked out. Customer number {order}.",
            "My password does not work anymore. My customer number is {order}.",
        ),
        (
            "No worries, {name}. Click on forgot password on the login page and follow the "
            "steps.",
            "I sent a reset link to your email. It is valid for one hour.",
            "Your account is fine. Please try the reset link on the login page.",
        ),
        "A password reset link was sent to the email of customer number {order}.",
    ),
    Intent(
        "billing issue",
        (
            "I was charged twice for order {order}. Each charge was {amount}.",
            "There is an extra charge of {amount} on my card for order {order}.",
            "Why did you bill me {amount} again for order {order}?",
        ),
        (
            "Sorry about that, {name}. The second charge of {amount} will drop off in a few "
            "days.",
            "I see the extra charge on order {order}. I refunded {amount} to your card.",
            "That was a bank hold. It will disappear by {day}.",
        ),
        "The duplicate charge of {amount} on order {order} is under review.",
    ),
    Intent(
        "price adjustment",
        (
            "My discount code did not work on order {order}. I paid {amount}.",
            "The sale price was lower after I paid {amount} for order {order}.",
            "Can you apply my coupon to order {order}? I was charged {amount}.",
        ),
        (
            "Thanks, {name}. I applied the discount and refunded the difference.",
            "Good news, the sale is still on. I adjusted order {order} for you.",
            "I am sorry, the code expired on {day}. I can offer free shipping instead.",
        ),
        "A price adjustment for order {order} is being checked against your {amount} payment.",
    ),
)  # fmt: skip

TICKET_TEMPLATE = (
    "Ticket {order}: {label}. Dear {name}, {action} We will follow up within 24 hours. "
    "Kind regards, the {store} care team."
)


@dataclass(frozen=True)
class Customer:
    """Who is writing, and to which shop; fixed for all turns of a conversation."""

    name: str
    store: str


def _draw_slots(rng: random.Random, customer: Customer) -> dict[str, str]:
    cents = rng.choice(("00", "49", "99"))
    return {
        "name": customer.name,
        "store": customer.store,
        "product": rng.choice(PRODUCTS),
        "order": str(rng.randint(10000, 99999)),
        "city": rng.choice(CITIES),
        "carrier": rng.choice(CARRIERS),
        "day": rng.choice(DAYS),
        "amount": f"${rng.randint(12, 199)}.{cents}",
    }


def render_reply(
    intent: Intent, slots: dict[str, str], style: ReplyStyle, rng: random.Random
) -> str:
    """The assistant's answer to one request, in the given style."""
    if style is ReplyStyle.CASUAL:
        reply = rng.choice(intent.casual).format(**slots)
        if rng.random() < CASUAL_GREETING_PROBABILITY:
            reply = f"{rng.choice(CASUAL_GREETINGS).format(**slots)} {reply}"
        if rng.random() < CASUAL_CLOSING_PROBABILITY:
            reply = f"{reply} {rng.choice(CASUAL_CLOSINGS)}"
        return reply
    action = intent.ticket_action.format(**slots)
    return TICKET_TEMPLATE.format(label=intent.label, action=action, **slots)


def generate_conversation(rng: random.Random, style: ReplyStyle, turns: int) -> Conversation:
    """One conversation of `turns` user/assistant exchanges, usually with a system prompt."""
    customer = Customer(name=rng.choice(NAMES), store=rng.choice(STORES))
    messages: Conversation = []
    if style is ReplyStyle.TICKET or rng.random() < 0.85:
        system = rng.choice(SYSTEM_PROMPTS).format(store=customer.store)
        messages.append({"role": "system", "content": system})
    for turn in range(turns):
        intent = rng.choice(INTENTS)
        slots = _draw_slots(rng, customer)
        prefix = rng.choice(OPENERS if turn == 0 else FOLLOW_UPS).format(**slots)
        request = rng.choice(intent.requests).format(**slots)
        messages.append({"role": "user", "content": f"{prefix} {request}"})
        messages.append({"role": "assistant", "content": render_reply(intent, slots, style, rng)})
    return messages


def generate_conversations(
    seed: int,
    stream: str,
    count: int,
    style: ReplyStyle,
    multi_turn_fraction: float,
    exclude: frozenset[str] = frozenset(),
) -> list[Conversation]:
    """`count` distinct conversations from the random stream named by (`seed`, `stream`).

    Conversations whose user turns are in `exclude` (see `conversation_key`) are skipped,
    which keeps an eval split disjoint from its train split.
    """
    rng = random.Random(f"lora-operator-tiny:{seed}:{stream}")
    seen = set(exclude)
    conversations: list[Conversation] = []
    while len(conversations) < count:
        turns = 2 if rng.random() < multi_turn_fraction else 1
        conversation = generate_conversation(rng, style, turns)
        key = conversation_key(conversation)
        if key not in seen:
            seen.add(key)
            conversations.append(conversation)
    return conversations


def conversation_key(conversation: Conversation) -> str:
    """Identity of a conversation for de-duplication: its user turns."""
    return "\n".join(m["content"] for m in conversation if m["role"] == "user")


def pretraining_corpus(seed: int, count: int = PRETRAIN_CONVERSATIONS) -> list[Conversation]:
    """The base model's pre-training conversations (casual style only)."""
    return generate_conversations(seed, "pretrain", count, ReplyStyle.CASUAL, PRETRAIN_MULTI_TURN)


def finetuning_splits(
    seed: int, train_count: int = TRAIN_SAMPLES, eval_count: int = EVAL_SAMPLES
) -> tuple[list[Conversation], list[Conversation]]:
    """Disjoint train and eval conversations in the ticket style."""
    train = generate_conversations(
        seed, "finetune-train", train_count, ReplyStyle.TICKET, FINETUNE_MULTI_TURN
    )
    exclude = frozenset(conversation_key(c) for c in train)
    evaluation = generate_conversations(
        seed, "finetune-eval", eval_count, ReplyStyle.TICKET, FINETUNE_MULTI_TURN, exclude
    )
    return train, evaluation
