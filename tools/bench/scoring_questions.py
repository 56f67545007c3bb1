"""Questions for bench_scoring.py: 40 short closed-form questions and an MMLU-like set with long contexts."""

from __future__ import annotations

SHORT: list[tuple[str, list[str]]] = [
    ("The capital of France is", [" Paris", " London", " Berlin", " Madrid"]),
    ("Water freezes at a temperature of", [" zero degrees Celsius", " one hundred degrees Celsius"]),
    ("The largest planet in our solar system is", [" Jupiter", " Mars", " Venus"]),
    ("Question: What color is the sky on a clear day?\nAnswer:", [" blue", " green", " red", " yellow"]),
    ("A baby cat is called a", [" kitten", " puppy", " calf", " foal", " chick"]),
    ("The opposite of hot is", [" cold", " warm", " loud"]),
    ("Two plus two equals", [" four", " five", " three"]),
    ("The sun rises in the", [" east", " west"]),
    ("Bees make", [" honey", " milk", " silk"]),
    ("Question: Which animal barks?\nAnswer:", [" a dog", " a fish", " a bird", " a snake"]),
    ("The chemical symbol for gold is", [" Au", " Ag", " Fe", " Pb"]),
    ("Shakespeare wrote", [" Hamlet", " War and Peace", " Don Quixote"]),
    ("There are seven days in a", [" week", " month", " year"]),
    ("To cut paper you use", [" scissors", " a spoon", " a pillow"]),
    ("The Great Wall is in", [" China", " Brazil", " Canada", " Egypt"]),
    ("Fish breathe through their", [" gills", " lungs", " ears"]),
    ("Question: How many legs does a spider have?\nAnswer:", [" eight", " six", " four", " ten"]),
    ("Ice is the solid form of", [" water", " air", " sand"]),
    ("The first month of the year is", [" January", " March", " December"]),
    ("A triangle has", [" three sides", " four sides", " five sides"]),
    ("Plants need sunlight to make", [" food", " noise", " stones"]),
    ("The Eiffel Tower is located in", [" Paris", " Rome", " Tokyo"]),
    ("People read books in a", [" library", " swimming pool", " garage"]),
    ("Question: What do cows drink?\nAnswer:", [" water", " milk", " coffee"]),
    ("The moon orbits the", [" Earth", " Sun", " Mars"]),
    ("A doctor works in a", [" hospital", " bakery", " farm", " mine"]),
    ("Rain falls from", [" clouds", " trees", " rocks"]),
    (
        "The boiling point of water at sea level is",
        [" 100 degrees Celsius", " 50 degrees Celsius", " 0 degrees Celsius"],
    ),
    ("Penguins live mostly in", [" Antarctica", " the Sahara", " Greenland"]),
    ("The color of grass is usually", [" green", " purple", " orange"]),
    ("Question: Which is a fruit?\nAnswer:", [" an apple", " a carrot", " a potato", " an onion"]),
    ("You wear shoes on your", [" feet", " hands", " head"]),
    ("The author of Harry Potter is", [" J. K. Rowling", " Stephen King", " Jane Austen"]),
    ("Light travels faster than", [" sound", " light"]),
    ("A year has twelve", [" months", " weeks", " days"]),
    ("Humans breathe in", [" oxygen", " helium", " neon"]),
    ("The tallest animal is the", [" giraffe", " elephant", " mouse"]),
    ("Question: What is 10 divided by 2?\nAnswer:", [" 5", " 2", " 20", " 8"]),
    ("Snow is usually", [" white", " black", " red"]),
    ("The heart pumps", [" blood", " air", " food", " water", " bile"]),
]

_SUBJECTS = [
    ("astronomy", "the formation of planets around young stars", "protoplanetary disks"),
    ("biology", "how cells copy their genetic material before dividing", "DNA replication"),
    ("history", "the causes and consequences of the industrial revolution in Britain", "steam power"),
    ("economics", "why prices rise when the supply of money grows faster than output", "inflation"),
    ("chemistry", "how catalysts change the speed of chemical reactions", "activation energy"),
    ("physics", "why objects in orbit appear weightless", "free fall"),
    ("geography", "how rivers shape valleys over long periods of time", "erosion"),
    ("computer science", "how a hash table finds values quickly", "hashing"),
]


def _passage(subject: str, topic: str, key: str, repeat: int) -> str:
    sentences = [
        f"This passage from a {subject} textbook discusses {topic}.",
        f"Scholars of {subject} have studied {topic} for many years, and the central idea is {key}.",
        f"Students often find {key} difficult at first, because it connects several earlier lessons.",
        "The explanation proceeds step by step, with examples drawn from everyday experience and from experiments.",
        f"Each example shows how {key} accounts for observations that would otherwise seem puzzling.",
        "Critics have raised objections, but most of them were answered by later and more careful measurements.",
    ]
    return " ".join(sentences * repeat)


MMLU_LIKE: list[tuple[str, list[str]]] = []
for i, (subject, topic, key) in enumerate(_SUBJECTS * 2):
    passage = _passage(subject, topic, key, 3 + i % 2)
    question = (
        f"The following is a multiple choice question about {subject}.\n\n{passage}\n\n"
        f"Question: Which idea is central to {topic}?\nA. {key}\nB. tradition\nC. coincidence\nD. luck\nAnswer:"
    )
    MMLU_LIKE.append((question, [" A", " B", " C", " D"]))
