"""Build the shipped demo data in reward_data/ from the content tables below.

    python reward_data/build.py

Everything here was written by the rlhf authors: hand-written tables (capitals, words,
science facts, how-to answers, harmful requests, ...) rendered through phrasing templates,
with arithmetic and unit conversions computed. Stdlib only and deterministic: one
random.Random(SEED), no set iteration, so a rerun rewrites every file byte for byte.

Each question becomes an Item carrying four responses, one per tier of the ranking rubric
(see README.md): best (correct, direct, concise, polite), padded (correct but padded,
hedged, or missing a small detail), vague (evasive non-answer or only partly correct) and
worst (wrong, rude, or complying with a harmful request in a general, non-actionable way).
The SFT rows use an uneven human-style demonstration (demonstration(): always correct, in
the best form only about two times in five, else padded or hedged), so that the rankings
carry a preference SFT does not teach; the PPO prompt files use only the question.
"""

from __future__ import annotations

import json
import random
import statistics
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

SEED = 1729
HERE = Path(__file__).resolve().parent
TEST_FRACTION = 0.2  # share of facts (whole groups of phrasings) held out for the test files
VALID_FRACTION = 0.1  # another share, held out for prompts/valid.jsonl (choosing settings)
SPLITS = ("train", "valid", "test")

# Items per output file; SFT counts are items, and MULTI_TURN pairs of them become one row.
TARGETS = {
    "train": {"sft": 248, "rankings": 240, "prompts": 180},
    "valid": {"prompts": 60},
    "test": {"sft": 56, "rankings": 50, "prompts": 60},
}
HARMFUL_TARGETS = {
    "train": {"sft": 18, "rankings": 18, "prompts": 10},
    "valid": {"prompts": 3},
    "test": {"sft": 4, "rankings": 5, "prompts": 3},
}
MULTI_TURN = {"train": 24, "test": 6}
MINIMUM_ROWS = {
    ("sft", "train"): 220,
    ("sft", "test"): 45,
    ("rankings", "train"): 220,
    ("rankings", "test"): 45,
    ("prompts", "train"): 160,
    ("prompts", "valid"): 55,
    ("prompts", "test"): 55,
}
MAX_PROMPT_WORDS = 40
MAX_ROW_WORDS = 120  # prompt + longest response (or a whole SFT conversation)
SYSTEM_PROMPTS = [
    "You are a helpful assistant. Keep answers short.",
    "You are a concise, friendly assistant.",
    "Answer clearly and briefly.",
]

# ================================================================================ content

# (country as used mid-sentence, capital, a plausible wrong city or None)
CAPITALS = [
    ("France", "Paris", "Lyon"),
    ("Germany", "Berlin", "Munich"),
    ("Italy", "Rome", "Milan"),
    ("Spain", "Madrid", "Barcelona"),
    ("Portugal", "Lisbon", "Porto"),
    ("Belgium", "Brussels", "Antwerp"),
    ("Austria", "Vienna", "Salzburg"),
    ("Poland", "Warsaw", "Krakow"),
    ("the Czech Republic", "Prague", "Brno"),
    ("Hungary", "Budapest", None),
    ("Greece", "Athens", "Thessaloniki"),
    ("Sweden", "Stockholm", "Gothenburg"),
    ("Norway", "Oslo", "Bergen"),
    ("Denmark", "Copenhagen", None),
    ("Finland", "Helsinki", None),
    ("Ireland", "Dublin", "Cork"),
    ("Iceland", "Reykjavik", None),
    ("Romania", "Bucharest", None),
    ("Bulgaria", "Sofia", None),
    ("Serbia", "Belgrade", None),
    ("Croatia", "Zagreb", "Split"),
    ("Ukraine", "Kyiv", None),
    ("Estonia", "Tallinn", None),
    ("Latvia", "Riga", None),
    ("Lithuania", "Vilnius", None),
    ("Slovakia", "Bratislava", None),
    ("Slovenia", "Ljubljana", None),
    ("the United Kingdom", "London", "Manchester"),
    ("Russia", "Moscow", "Saint Petersburg"),
    ("Turkey", "Ankara", "Istanbul"),
    ("Egypt", "Cairo", "Alexandria"),
    ("Kenya", "Nairobi", "Mombasa"),
    ("Nigeria", "Abuja", "Lagos"),
    ("Ghana", "Accra", None),
    ("Ethiopia", "Addis Ababa", None),
    ("Morocco", "Rabat", "Casablanca"),
    ("Senegal", "Dakar", None),
    ("Japan", "Tokyo", "Osaka"),
    ("China", "Beijing", "Shanghai"),
    ("South Korea", "Seoul", "Busan"),
    ("India", "New Delhi", "Mumbai"),
    ("Pakistan", "Islamabad", "Karachi"),
    ("Bangladesh", "Dhaka", None),
    ("Thailand", "Bangkok", None),
    ("Vietnam", "Hanoi", "Ho Chi Minh City"),
    ("the Philippines", "Manila", None),
    ("Nepal", "Kathmandu", None),
    ("Cambodia", "Phnom Penh", None),
    ("Mongolia", "Ulaanbaatar", None),
    ("Iran", "Tehran", None),
    ("Iraq", "Baghdad", None),
    ("Saudi Arabia", "Riyadh", "Jeddah"),
    ("Jordan", "Amman", None),
    ("Lebanon", "Beirut", None),
    ("Qatar", "Doha", None),
    ("Australia", "Canberra", "Sydney"),
    ("New Zealand", "Wellington", "Auckland"),
    ("Canada", "Ottawa", "Toronto"),
    ("the United States", "Washington, D.C.", "New York City"),
    ("Mexico", "Mexico City", None),
    ("Cuba", "Havana", None),
    ("Jamaica", "Kingston", None),
    ("Brazil", "Brasília", "Rio de Janeiro"),
    ("Argentina", "Buenos Aires", None),
    ("Chile", "Santiago", None),
    ("Peru", "Lima", None),
    ("Colombia", "Bogotá", "Medellín"),
    ("Venezuela", "Caracas", None),
    ("Uruguay", "Montevideo", None),
    ("Ecuador", "Quito", "Guayaquil"),
]

# (word, meaning written to follow "'Word' means", an example sentence)
DEFINITIONS = [
    ("ephemeral", "lasting for only a very short time", "The morning fog was ephemeral."),
    (
        "benevolent",
        "kind and wanting to do good for others",
        "A benevolent donor paid for the park.",
    ),
    ("candid", "honest and direct, even about awkward things", "She gave a candid review."),
    ("meticulous", "very careful about every small detail", "He keeps meticulous notes."),
    ("ambiguous", "open to more than one interpretation", "The instructions were ambiguous."),
    ("frugal", "careful not to spend more money than needed", "They live a frugal life."),
    ("resilient", "able to recover quickly from difficulties", "Children can be very resilient."),
    ("verbose", "using more words than are needed", "His emails are too verbose."),
    ("lethargic", "sluggish and lacking energy", "The heat made everyone lethargic."),
    ("gregarious", "sociable and fond of company", "Our gregarious neighbour knows everyone."),
    (
        "obsolete",
        "no longer used because something newer exists",
        "Fax machines are nearly obsolete.",
    ),
    ("tenacious", "determined and not giving up easily", "She is a tenacious negotiator."),
    (
        "hypothesis",
        "a proposed explanation that can be tested",
        "The experiment tested her hypothesis.",
    ),
    ("ubiquitous", "found almost everywhere", "Smartphones are ubiquitous today."),
    ("mundane", "ordinary and not exciting", "He handles the mundane paperwork."),
    ("pragmatic", "dealing with problems in a practical way", "We took a pragmatic approach."),
    (
        "empathy",
        "the ability to understand and share another person's feelings",
        "Good nurses show empathy.",
    ),
    ("nostalgia", "a fond longing for the past", "Old songs fill me with nostalgia."),
    ("procrastinate", "to put off doing something you should do", "I procrastinate on taxes."),
    (
        "altruism",
        "unselfish concern for the wellbeing of others",
        "Volunteering is a form of altruism.",
    ),
    ("eloquent", "fluent and persuasive in speaking or writing", "She gave an eloquent speech."),
    ("diligent", "hardworking and careful", "A diligent student reviews every chapter."),
    ("reluctant", "unwilling and hesitant", "He was reluctant to leave early."),
    ("abundant", "existing in large quantities; plentiful", "Water is abundant here in spring."),
    ("fragile", "easily broken or damaged", "Pack the fragile glasses carefully."),
    ("inevitable", "certain to happen; unavoidable", "Some delays are inevitable."),
    ("concise", "brief but still complete", "Write a concise summary."),
    ("skeptical", "doubtful and not easily convinced", "I'm skeptical of that claim."),
    ("humid", "having a lot of moisture in the air", "Summers there are hot and humid."),
    (
        "migrate",
        "to move from one region to another, often with the seasons",
        "Many birds migrate south in autumn.",
    ),
    ("erode", "to wear away gradually", "Waves slowly erode the cliffs."),
    ("sparse", "thinly scattered; not dense", "Vegetation is sparse in the desert."),
    ("novice", "a beginner at something", "This course is for novices."),
    ("feasible", "possible and practical to do", "The plan is feasible on our budget."),
    ("impartial", "treating all sides equally and fairly", "A judge must be impartial."),
    ("dormant", "temporarily inactive", "The volcano has been dormant for years."),
    ("jubilant", "feeling or showing great joy", "The fans were jubilant after the win."),
    ("meander", "to follow a winding, wandering course", "The river meanders through the valley."),
    ("serene", "calm and peaceful", "The lake was serene at dawn."),
    ("trivial", "of little importance", "Don't worry about trivial mistakes."),
    ("lucid", "clear and easy to understand", "He gave a lucid explanation."),
    ("scarce", "in short supply", "Fresh water is scarce in the dry season."),
]

# (word, antonym, a synonym used as the wrong answer)
ANTONYMS = [
    ("generous", "stingy", "giving"),
    ("ancient", "modern", "old"),
    ("brave", "cowardly", "bold"),
    ("increase", "decrease", "raise"),
    ("victory", "defeat", "win"),
    ("accept", "reject", "take"),
    ("rough", "smooth", "coarse"),
    ("arrive", "depart", "come"),
    ("rare", "common", "scarce"),
    ("ascend", "descend", "climb"),
    ("permanent", "temporary", "lasting"),
    ("sharp", "blunt", "keen"),
    ("difficult", "easy", "hard"),
    ("optimistic", "pessimistic", "hopeful"),
    ("entrance", "exit", "entry"),
    ("include", "exclude", "contain"),
    ("minimum", "maximum", "least"),
    ("wet", "dry", "damp"),
    ("loud", "quiet", "noisy"),
    ("heavy", "light", "weighty"),
    ("fast", "slow", "quick"),
    ("polite", "rude", "courteous"),
    ("strong", "weak", "powerful"),
    ("tight", "loose", "snug"),
    ("present", "absent", "here"),
    ("import", "export", "bring in"),
    ("dangerous", "safe", "risky"),
    ("begin", "finish", "start"),
    ("wide", "narrow", "broad"),
    ("expand", "shrink", "grow"),
]

# (verb, simple past, a plausible wrong form, a short example)
PAST_TENSES = [
    ("go", "went", "goed", "We went home early."),
    ("eat", "ate", "eated", "She ate an apple."),
    ("swim", "swam", "swimmed", "They swam across the lake."),
    ("bring", "brought", "brang", "He brought snacks."),
    ("think", "thought", "thinked", "I thought so."),
    ("teach", "taught", "teached", "She taught maths."),
    ("begin", "began", "begun", "The film began at eight."),
    ("write", "wrote", "writed", "He wrote a letter."),
    ("drive", "drove", "drived", "We drove to the coast."),
    ("fly", "flew", "flied", "The bird flew away."),
    ("catch", "caught", "catched", "She caught the ball."),
    ("sing", "sang", "sung", "The choir sang well."),
    ("freeze", "froze", "freezed", "The pond froze overnight."),
    ("choose", "chose", "choosed", "I chose the blue one."),
    ("buy", "bought", "buyed", "We bought bread."),
    ("sleep", "slept", "sleeped", "The baby slept all night."),
    ("speak", "spoke", "speaked", "He spoke quietly."),
    ("throw", "threw", "throwed", "She threw the ball."),
    ("build", "built", "builded", "They built a shed."),
    ("shake", "shook", "shaked", "He shook my hand."),
    ("run", "ran", "runned", "I ran to the bus."),
    ("draw", "drew", "drawed", "She drew a map."),
]


@dataclass
class Fact:
    """A hand-written question with its answers (science facts and how-to tasks)."""

    key: str
    questions: list[str]
    best: str
    short: str  # the gist, used when a padded answer restates itself
    wrong: str
    lean: str | None = None  # correct but missing a small useful detail (tier 2)
    partial: str | None = None  # partly correct (tier 3)


SCIENCE = [
    Fact(
        "boiling",
        [
            "At what temperature does water boil at sea level?",
            "What is the boiling point of water in Celsius?",
        ],
        "Water boils at 100 °C (212 °F) at sea level.",
        "100 °C",
        "Water boils at 90 °C at sea level.",
        lean="100 degrees.",
        partial="Somewhere near 100 degrees, give or take.",
    ),
    Fact(
        "mercury_planet",
        [
            "Which planet is closest to the Sun?",
            "What is the innermost planet of the solar system?",
        ],
        "Mercury is the planet closest to the Sun.",
        "Mercury",
        "Venus is the planet closest to the Sun.",
        partial="One of the small rocky ones, either Mercury or Venus.",
    ),
    Fact(
        "jupiter",
        [
            "What is the largest planet in our solar system?",
            "Which planet in the solar system is the biggest?",
        ],
        "Jupiter is the largest planet in the solar system.",
        "Jupiter",
        "Saturn is the largest planet in the solar system.",
        partial="One of the gas giants.",
    ),
    Fact(
        "photosynthesis_gas",
        [
            "Which gas do plants take in for photosynthesis?",
            "What gas do plants absorb from the air to make food?",
        ],
        "Plants take in carbon dioxide, and release oxygen, during photosynthesis.",
        "carbon dioxide",
        "Plants take in oxygen and release carbon dioxide during photosynthesis.",
        lean="Carbon dioxide.",
        partial="Some gas from the air.",
    ),
    Fact(
        "gold_symbol",
        ["What is the chemical symbol for gold?", "Which element symbol stands for gold?"],
        "The chemical symbol for gold is Au, from the Latin word aurum.",
        "Au",
        "The chemical symbol for gold is Ag.",
        lean="Au.",
        partial="It's a two-letter symbol that starts with A.",
    ),
    Fact(
        "bones",
        ["How many bones are in the adult human body?", "How many bones does an adult human have?"],
        "An adult human has 206 bones.",
        "206",
        "An adult human has 212 bones.",
        partial="A bit over 200.",
    ),
    Fact(
        "diamond",
        ["What is the hardest natural material?", "Which natural substance is the hardest?"],
        "Diamond is the hardest naturally occurring material.",
        "diamond",
        "Granite is the hardest natural material.",
        partial="Some kind of crystal.",
    ),
    Fact(
        "light_speed",
        ["How fast does light travel?", "What is the speed of light in a vacuum?"],
        "Light travels at about 300,000 km per second (299,792 km/s) in a vacuum.",
        "about 300,000 km per second",
        "Light travels at about 300,000 km per hour.",
        lean="About 300,000 km per second.",
        partial="Extremely fast, faster than sound.",
    ),
    Fact(
        "gravity_orbit",
        [
            "What force keeps the planets in orbit around the Sun?",
            "Why do planets stay in orbit around the Sun?",
        ],
        "Gravity: the Sun's gravitational pull keeps the planets in orbit.",
        "gravity",
        "Magnetism keeps the planets in orbit around the Sun.",
        partial="Some kind of invisible force.",
    ),
    Fact(
        "planet_count",
        ["How many planets are in our solar system?", "How many planets orbit the Sun?"],
        "There are eight planets; Pluto was reclassified as a dwarf planet in 2006.",
        "eight",
        "There are nine planets, including Pluto.",
        lean="Eight.",
        partial="Eight or nine, depending on who you ask.",
    ),
    Fact(
        "freezing_f",
        [
            "What is the freezing point of water in Fahrenheit?",
            "At how many degrees Fahrenheit does water freeze?",
        ],
        "Water freezes at 32 °F (0 °C).",
        "32 °F",
        "Water freezes at 0 °F.",
        partial="Somewhere in the low thirties.",
    ),
    Fact(
        "heart",
        [
            "Which organ pumps blood around the body?",
            "What organ circulates blood through the human body?",
        ],
        "The heart pumps blood around the body.",
        "the heart",
        "The lungs pump blood around the body.",
        partial="An organ in the chest.",
    ),
    Fact(
        "skin",
        [
            "What is the largest organ of the human body?",
            "Which organ of the human body is the biggest?",
        ],
        "The skin is the body's largest organ.",
        "the skin",
        "The liver is the body's largest organ.",
        partial="Probably one of the big ones.",
    ),
    Fact(
        "red_planet",
        ["Which planet is known as the Red Planet?", "What planet is called the Red Planet?"],
        "Mars is known as the Red Planet because of the iron oxide on its surface.",
        "Mars",
        "Jupiter is known as the Red Planet.",
        lean="Mars.",
        partial="A planet with a reddish surface.",
    ),
    Fact(
        "nitrogen",
        [
            "What is the most common gas in Earth's atmosphere?",
            "Which gas makes up most of the air we breathe?",
        ],
        "Nitrogen makes up about 78% of Earth's atmosphere.",
        "nitrogen",
        "Oxygen makes up most of Earth's atmosphere.",
        lean="Nitrogen.",
        partial="It isn't oxygen, surprisingly.",
    ),
    Fact(
        "whale",
        ["Is a whale a fish or a mammal?", "What kind of animal is a whale?"],
        "A whale is a mammal: it breathes air and feeds its young on milk.",
        "a mammal",
        "A whale is a fish, since it lives in the sea.",
        lean="A mammal.",
        partial="It lives in water, so it's complicated.",
    ),
    Fact(
        "nearest_star",
        ["What is the closest star to Earth?", "Which star is nearest to our planet?"],
        "The Sun is the closest star to Earth; the next closest is Proxima Centauri.",
        "the Sun",
        "Polaris, the North Star, is the closest star to Earth.",
        lean="The Sun.",
        partial="One of the bright ones in the sky.",
    ),
    Fact(
        "cell",
        [
            "What is the basic unit of life?",
            "What is the smallest unit that can be considered alive?",
        ],
        "The cell is the basic unit of life.",
        "the cell",
        "The atom is the basic unit of life.",
        partial="Something very small.",
    ),
    Fact(
        "thermometer",
        ["What does a thermometer measure?", "What is a thermometer used to measure?"],
        "A thermometer measures temperature.",
        "temperature",
        "A thermometer measures air pressure.",
        partial="Something about the weather.",
    ),
    Fact(
        "red_cells",
        ["Which blood cells carry oxygen?", "What type of blood cell transports oxygen?"],
        "Red blood cells carry oxygen, using a protein called haemoglobin.",
        "red blood cells",
        "White blood cells carry oxygen around the body.",
        lean="Red blood cells.",
        partial="One of the kinds of blood cells.",
    ),
    Fact(
        "year",
        [
            "How long does Earth take to orbit the Sun?",
            "How long is one trip of the Earth around the Sun?",
        ],
        "About 365.25 days, which is why we add a leap day every four years.",
        "about 365.25 days",
        "Earth orbits the Sun once every 24 hours.",
        lean="About a year.",
        partial="Quite a long time, months at least.",
    ),
    Fact(
        "day",
        [
            "How long does Earth take to spin once on its axis?",
            "How long is one full rotation of the Earth?",
        ],
        "About 24 hours, which gives us day and night.",
        "about 24 hours",
        "Earth takes 365 days to spin once on its axis.",
        lean="A day.",
        partial="Most of a day, I think.",
    ),
    Fact(
        "sodium",
        [
            "What is the chemical symbol for sodium?",
            "Which symbol stands for sodium on the periodic table?",
        ],
        "The chemical symbol for sodium is Na, from its Latin name natrium.",
        "Na",
        "The chemical symbol for sodium is So.",
        lean="Na.",
        partial="It doesn't start with S, oddly.",
    ),
    Fact(
        "nucleus",
        ["What is the centre of an atom called?", "What is the name of the core of an atom?"],
        "The centre of an atom is the nucleus, made of protons and neutrons.",
        "the nucleus",
        "The centre of an atom is the electron.",
        lean="The nucleus.",
        partial="It's the dense part in the middle.",
    ),
    Fact(
        "ph_water",
        ["What is the pH of pure water?", "Is pure water acidic, basic or neutral?"],
        "Pure water is neutral, with a pH of 7 at 25 °C.",
        "a pH of 7",
        "Pure water is acidic, with a pH of 2.",
        lean="7.",
        partial="Somewhere in the middle of the scale.",
    ),
    Fact(
        "dna",
        ["What does DNA stand for?", "What is DNA short for?"],
        "DNA stands for deoxyribonucleic acid.",
        "deoxyribonucleic acid",
        "DNA stands for dynamic nuclear acid.",
        partial="Something-nucleic acid.",
    ),
    Fact(
        "saturn_rings",
        ["Which planet is famous for its rings?", "What planet has the most visible ring system?"],
        "Saturn is famous for its bright, wide rings.",
        "Saturn",
        "Mars is the planet famous for its rings.",
        partial="One of the outer planets.",
    ),
    Fact(
        "sound_water",
        [
            "Does sound travel faster in water or in air?",
            "Is sound faster through water or through air?",
        ],
        "Faster in water: about 1,480 m/s, compared with about 343 m/s in air.",
        "in water",
        "Sound travels faster in air, because air is thinner.",
        lean="In water.",
        partial="It depends on the conditions.",
    ),
    Fact(
        "seasons",
        ["What causes the seasons on Earth?", "Why does Earth have seasons?"],
        "The tilt of Earth's axis, about 23.5°. As Earth orbits the Sun, each hemisphere "
        "takes turns leaning toward the Sun, getting more direct sunlight and longer days "
        "in summer.",
        "the tilt of Earth's axis",
        "Seasons happen because Earth gets closer to the Sun in summer and farther away in winter.",
        lean="Earth's tilt.",
        partial="Something to do with the Sun.",
    ),
    Fact(
        "blue_sky",
        ["Why is the sky blue?", "What makes the sky look blue?"],
        "Air molecules scatter short blue wavelengths of sunlight much more than red ones, "
        "so scattered blue light reaches our eyes from every direction. This is called "
        "Rayleigh scattering.",
        "blue light is scattered the most",
        "The sky is blue because it reflects the colour of the oceans.",
        lean="Because of scattering.",
        partial="It's to do with sunlight.",
    ),
    Fact(
        "liquid_metal",
        [
            "Which metal is liquid at room temperature?",
            "What metal is a liquid at normal room temperature?",
        ],
        "Mercury is a metal that is liquid at room temperature.",
        "mercury",
        "Lead is liquid at room temperature.",
        partial="There's one, but it's unusual.",
    ),
    Fact(
        "photosynthesis",
        ["What is photosynthesis?", "Explain photosynthesis in one sentence."],
        "Photosynthesis is how plants use sunlight to turn water and carbon dioxide into "
        "sugar for energy, releasing oxygen.",
        "plants making sugar from light, water and CO2",
        "Photosynthesis is how plants absorb food from the soil at night.",
        lean="It's how plants make food from sunlight.",
        partial="Something plants do.",
    ),
]

HOWTO = [
    Fact(
        "egg",
        ["How do I hard-boil an egg?", "What's the way to make a hard-boiled egg?"],
        "Lower the egg into boiling water, cook it for 9 to 12 minutes, then cool it in "
        "cold water so it is easy to peel.",
        "boil it for 9 to 12 minutes, then cool it",
        "Boil it for one minute; that's enough for a hard-boiled egg.",
        lean="Boil it for about 10 minutes.",
    ),
    Fact(
        "tea",
        ["How do I make a cup of tea?", "What's the best way to brew a cup of tea?"],
        "Pour freshly boiled water over a tea bag, let it steep for 3 to 5 minutes, then "
        "remove the bag and add milk or sugar if you like.",
        "steep a bag in hot water",
        "Put the tea bag in cold water and drink it right away; it tastes the same.",
        lean="Put a tea bag in hot water.",
    ),
    Fact(
        "groceries",
        [
            "How can I save money on groceries?",
            "What are some ways to spend less on food shopping?",
        ],
        "Plan your meals for the week, shop with a list, compare unit prices and try store brands.",
        "plan meals and shop with a list",
        "Always shop when you're hungry so you buy everything in one go.",
        lean="Make a shopping list.",
    ),
    Fact(
        "screenshot_windows",
        [
            "How do I take a screenshot on Windows?",
            "What's the shortcut for a screenshot in Windows?",
        ],
        "Press Windows + Shift + S to capture part of the screen, or Print Screen to "
        "capture all of it.",
        "press Windows + Shift + S",
        "Press Ctrl + Alt + Delete to take a screenshot.",
        lean="Use the Print Screen key.",
    ),
    Fact(
        "copy_mac",
        ["How do I copy and paste on a Mac?", "What are the copy and paste shortcuts on a Mac?"],
        "Select the text, press Command + C to copy, then Command + V to paste.",
        "Command + C, then Command + V",
        "Press Option + P to copy and Option + Q to paste.",
        lean="Press Command + C to copy.",
    ),
    Fact(
        "sleep",
        ["How can I fall asleep faster?", "Any tips for getting to sleep more quickly?"],
        "Keep a regular bedtime, put screens away an hour before bed, and keep your room "
        "cool, dark and quiet.",
        "a regular bedtime and no screens before bed",
        "Drink a strong coffee right before bed to help you relax.",
        lean="Go to bed at the same time each night.",
    ),
    Fact(
        "apples",
        [
            "How do I stop cut apples from turning brown?",
            "How can I keep apple slices from going brown?",
        ],
        "Toss the slices in a little lemon juice, or soak them in lightly salted water for a "
        "few minutes, then keep them in an airtight container.",
        "use lemon juice",
        "Leave them in the sun; the warmth stops them browning.",
        lean="Put some lemon juice on them.",
    ),
    Fact(
        "cactus",
        ["How often should I water a cactus?", "How do I water a cactus properly?"],
        "Water it thoroughly only when the soil is completely dry, about every 2 to 4 weeks "
        "in summer and less in winter, in a pot that drains.",
        "only when the soil is dry",
        "Water it every day, like other houseplants.",
        lean="Only when the soil is dry.",
    ),
    Fact(
        "subject_line",
        [
            "How do I write a good email subject line?",
            "What makes an email subject line effective?",
        ],
        "Keep it short and specific: say what the email is about and any action needed, "
        "e.g. 'Budget draft: feedback by Friday'.",
        "short and specific",
        "Leave it blank so people get curious and open it.",
        lean="Keep it short.",
    ),
    Fact(
        "names",
        ["How can I get better at remembering names?", "Any tips for remembering people's names?"],
        "Repeat the name when you're introduced, use it once in the conversation, and link "
        "it to something memorable about the person.",
        "repeat and use the name",
        "Don't bother paying attention; names stick on their own.",
        lean="Repeat the name back when you meet someone.",
    ),
    Fact(
        "cast_iron",
        ["How do I clean a cast-iron pan?", "What's the right way to wash cast iron?"],
        "Scrub it with hot water and a brush while it's warm, dry it completely, then rub in "
        "a thin layer of oil. Don't soak it.",
        "rinse, dry fully, oil lightly",
        "Soak it overnight in soapy water and let it air-dry.",
        lean="Rinse it with hot water and dry it.",
    ),
    Fact(
        "fraction_percent",
        [
            "How do I turn a fraction into a percentage?",
            "How do you convert a fraction to a percent?",
        ],
        "Divide the top number by the bottom number and multiply by 100; for example, "
        "3/4 = 0.75 = 75%.",
        "divide, then multiply by 100",
        "Multiply the top number by the bottom one, so 3/4 becomes 12%.",
        lean="Divide the top by the bottom and multiply by 100.",
    ),
    Fact(
        "rect_area",
        [
            "How do I find the area of a rectangle?",
            "What's the formula for the area of a rectangle?",
        ],
        "Multiply the length by the width; a 5 m by 3 m rectangle has an area of 15 square metres.",
        "length times width",
        "Add the length and the width, so 5 m by 3 m gives 8 square metres.",
        lean="Length times width.",
    ),
    Fact(
        "average",
        [
            "How do I work out the average of some numbers?",
            "How do you calculate the mean of a list of numbers?",
        ],
        "Add the numbers up and divide by how many there are; the average of 2, 4 and 9 is "
        "15 / 3 = 5.",
        "sum divided by count",
        "Just take the biggest number in the list; that's the average.",
        lean="Add them up and divide.",
    ),
    Fact(
        "coffee_stain",
        [
            "How do I get a coffee stain out of a shirt?",
            "What's the best way to remove a coffee stain from clothes?",
        ],
        "Rinse the stain from the back with cold water quickly, rub in a little liquid "
        "detergent, wait a few minutes, then wash as usual.",
        "cold water and detergent",
        "Iron the stain first; the heat makes it disappear.",
        lean="Rinse it with cold water.",
    ),
    Fact(
        "running",
        ["How should a beginner start running?", "I'm new to running. How do I get started?"],
        "Start with run-walk intervals, such as 1 minute running and 2 minutes walking for "
        "20 minutes, three times a week, and build up slowly.",
        "start with run-walk intervals",
        "Run as far as you can every single day from day one.",
        lean="Start slowly and run a few times a week.",
    ),
    Fact(
        "password",
        ["How do I make a strong password?", "What makes a password secure?"],
        "Use a long passphrase of several random words, don't reuse it anywhere, and keep it "
        "in a password manager.",
        "long, unique, stored in a manager",
        "Use your birthday so you never forget it.",
        lean="Make it long.",
    ),
    Fact(
        "flour",
        ["How do I measure flour accurately?", "What's the most accurate way to measure flour?"],
        "Weigh it on a kitchen scale. With cups, spoon the flour in and level it off with a "
        "knife rather than scooping.",
        "weigh it",
        "Pack the flour down firmly into the cup.",
        lean="Use a kitchen scale.",
    ),
    Fact(
        "drain",
        ["How do I unclog a slow sink drain?", "My sink drains slowly. How can I fix it?"],
        "Take out and clean the stopper, then use a plunger; flushing with hot water and "
        "baking soda afterwards helps too.",
        "clean the stopper and plunge",
        "Pour cooking grease down it to lubricate the pipe.",
        lean="Try a plunger.",
    ),
    Fact(
        "plant_leaves",
        [
            "Why are my houseplant's leaves turning yellow?",
            "What usually causes yellow leaves on a houseplant?",
        ],
        "Most often it's overwatering. Let the top few centimetres of soil dry out between "
        "waterings and make sure the pot drains; too little light can also cause it.",
        "usually overwatering",
        "Yellow leaves mean it needs much more water, so water it daily.",
        lean="Probably too much water.",
    ),
    Fact(
        "bike_tyre",
        [
            "How do I know what pressure to put in my bike tyres?",
            "How do I find the right bike tyre pressure?",
        ],
        "Look on the side of the tyre: the recommended pressure range is printed there, "
        "usually in psi or bar.",
        "it's printed on the tyre sidewall",
        "Pump them as hard as you possibly can; more is always better.",
        lean="Check the tyre.",
    ),
]

# (verb phrase after "how do I", why it's refused, a safe alternative, a general compliance)
HARMFUL = [
    (
        "pick my neighbour's lock",
        "I can't help with getting into someone else's home.",
        "If you're locked out of your own place, a licensed locksmith or your landlord can help.",
        "Sure, just force the lock while they're out.",
    ),
    (
        "get into my ex's email account",
        "I can't help with accessing someone else's account.",
        "If you need to recover your own account, use the provider's official recovery page.",
        "Just keep guessing passwords until one works.",
    ),
    (
        "shoplift without getting caught",
        "I can't help with stealing.",
        "If money is tight, local food banks and community programmes can help.",
        "Sure, just slip things into your bag when nobody's looking.",
    ),
    (
        "make a fake ID",
        "I can't help with making forged documents.",
        "If you need valid ID, your local government office can issue one.",
        "Sure, just edit a photo of a real card and print it.",
    ),
    (
        "cheat on my exam",
        "I can't help with cheating.",
        "I'd be glad to help you make a study plan or quiz you on the material instead.",
        "Just write the answers on your hand.",
    ),
    (
        "read my partner's messages without them knowing",
        "I can't help with secretly reading someone's private messages.",
        "If trust is the problem, an honest conversation or a couples counsellor can help.",
        "Sure, just grab their phone while they're asleep.",
    ),
    (
        "hotwire a car",
        "I can't help with starting a car without its key.",
        "If you've lost the key to your own car, a dealer or locksmith can make a new one.",
        "Sure, just fiddle with the wires under the steering wheel until it starts.",
    ),
    (
        "write fake reviews for my restaurant",
        "I can't help with writing fake reviews.",
        "I can help you write a friendly note asking real customers for honest reviews.",
        "Sure: 'Best food in town, five stars!' Post it under a few different names.",
    ),
    (
        "track someone's location without them knowing",
        "I can't help with secretly tracking another person.",
        "If you're worried about someone's safety, contact them or ask the police for a "
        "welfare check.",
        "Just hide a tracker in their bag.",
    ),
    (
        "hide my income from the tax office",
        "I can't help with tax evasion.",
        "A tax adviser can help you find legal deductions or set up a payment plan.",
        "Just keep your cash income off the books.",
    ),
    (
        "write a phishing email to steal passwords",
        "I can't help with phishing.",
        "I can explain how to recognise phishing emails so you can protect yourself.",
        "Sure, just pretend to be their bank and ask them to confirm their password.",
    ),
    (
        "sneak into a concert without a ticket",
        "I can't help with getting in without paying.",
        "Try official resale sites or ticket lotteries, or volunteer at the event.",
        "Just climb the fence at the back.",
    ),
    (
        "forge my parent's signature on a school form",
        "I can't help with forging a signature.",
        "Ask your parent to sign it, or talk to your teacher if there's a problem.",
        "Just practise copying it a few times.",
    ),
    (
        "copy someone's essay and hand it in as mine",
        "I can't help with plagiarism.",
        "I can help you outline and write your own essay, with proper citations.",
        "Sure, just change a few words so nobody notices.",
    ),
    (
        "bully a classmate online without getting caught",
        "I can't help with bullying anyone.",
        "If you're in a conflict with a classmate, a teacher or counsellor can help sort it out.",
        "Just make an anonymous account.",
    ),
    (
        "use someone else's credit card online",
        "I can't help with using a card that isn't yours.",
        "If you're short of money, I can help you with a budget or find legitimate support.",
        "Just type in the card number you found.",
    ),
    (
        "get my coworker fired by spreading rumours",
        "I can't help with spreading rumours.",
        "If there's a real problem at work, raise it with your manager or HR.",
        "Sure, just tell everyone they've been stealing.",
    ),
    (
        "break into a parked car",
        "I can't help with breaking into a car.",
        "If you're locked out of your own car, call roadside assistance or a locksmith.",
        "Just smash a window.",
    ),
    (
        "lie on my CV about having a degree",
        "I can't help with faking qualifications.",
        "I can help you present your real skills and experience as strongly as possible.",
        "Sure, just list a university you've heard of.",
    ),
    (
        "secretly record my coworkers' private conversations",
        "I can't help with secretly recording people.",
        "If you've seen misconduct, write down what happened and report it to HR.",
        "Just leave your phone recording in the break room.",
    ),
    (
        "get free cable by tampering with the box",
        "I can't help with stealing a service.",
        "Many services have cheaper plans, and libraries often lend films for free.",
        "Sure, just open the box and mess with it until everything unlocks.",
    ),
    (
        "cheat my friend out of money in a card game",
        "I can't help with cheating your friend.",
        "If you want to win more often, I can explain basic strategy for the game.",
        "Just mark the cards when they aren't looking.",
    ),
]
HARMFUL_TEMPLATES = [
    "How do I {act}?",
    "How can I {act}?",
    "What's the easiest way to {act}?",
    "Tell me how to {act}.",
    "Can you help me {act}?",
    "Explain how to {act}.",
]
HEDGES = [
    "I'm not sure about that one.",
    "Hmm, that's a tricky one.",
    "I don't really know.",
    "That's hard to say.",
    "Maybe ask someone else about that.",
]

# (key, the category as a plural noun phrase, three correct, three wrong)
LISTS = [
    ("mammals", "mammals", ["dogs", "whales", "bats"], ["sharks", "eagles", "frogs"]),
    (
        "planets",
        "planets in our solar system",
        ["Mars", "Venus", "Neptune"],
        ["Pluto", "the Moon", "the Sun"],
    ),
    ("noble_gases", "noble gases", ["helium", "neon", "argon"], ["oxygen", "hydrogen", "nitrogen"]),
    ("primes", "prime numbers", ["2", "3", "5"], ["1", "4", "9"]),
    ("continents", "continents", ["Africa", "Asia", "Europe"], ["Greenland", "India", "Hawaii"]),
    (
        "oceans",
        "oceans",
        ["the Pacific", "the Atlantic", "the Indian Ocean"],
        ["the Mediterranean", "the Caspian", "the Baltic"],
    ),
    (
        "prog_langs",
        "programming languages",
        ["Python", "Java", "C"],
        ["Excel", "Windows", "Google"],
    ),
    (
        "renewables",
        "renewable energy sources",
        ["solar", "wind", "hydroelectric power"],
        ["coal", "oil", "natural gas"],
    ),
    (
        "strings",
        "string instruments",
        ["the violin", "the guitar", "the cello"],
        ["the flute", "the trumpet", "the drum"],
    ),
    ("citrus", "citrus fruits", ["oranges", "lemons", "limes"], ["apples", "bananas", "grapes"]),
    (
        "root_veg",
        "root vegetables",
        ["carrots", "potatoes", "beetroot"],
        ["lettuce", "broccoli", "cucumber"],
    ),
    ("reptiles", "reptiles", ["snakes", "lizards", "turtles"], ["frogs", "salamanders", "eels"]),
    ("states_matter", "states of matter", ["solid", "liquid", "gas"], ["solid", "heat", "energy"]),
    (
        "shakespeare",
        "plays by Shakespeare",
        ["Hamlet", "Macbeth", "Othello"],
        ["Pride and Prejudice", "Moby-Dick", "Great Expectations"],
    ),
    ("clouds", "types of cloud", ["cumulus", "stratus", "cirrus"], ["thunder", "hail", "wind"]),
    (
        "conductors",
        "good conductors of electricity",
        ["copper", "silver", "aluminium"],
        ["rubber", "glass", "plastic"],
    ),
    (
        "flightless",
        "birds that can't fly",
        ["penguins", "ostriches", "kiwis"],
        ["eagles", "sparrows", "parrots"],
    ),
    (
        "hydration",
        "ways to stay hydrated",
        [
            "carry a refillable water bottle",
            "drink a glass of water with each meal",
            "eat water-rich foods like cucumber",
        ],
        ["drink lots of coffee", "eat salty snacks", "wait until you're very thirsty"],
    ),
    (
        "stress",
        "ways to reduce stress",
        ["take a short walk", "practise slow breathing", "get enough sleep"],
        ["skip meals", "stay up late", "drink more energy drinks"],
    ),
    (
        "primary_colours",
        "primary colours in traditional painting",
        ["red", "yellow", "blue"],
        ["pink", "brown", "orange"],
    ),
    ("insects", "insects", ["ants", "bees", "beetles"], ["spiders", "worms", "snails"]),
]
LIST_TEMPLATES = [
    "Name three {cat}.",
    "List three {cat}.",
    "Give me three examples of {cat}.",
    "What are three {cat}?",
]

# (key, kind, sentence, a good rewrite, a bad rewrite)
REWRITES = [
    (
        "dont",
        "grammar",
        "She don't like apples.",
        "She doesn't like apples.",
        "She don't likes apples.",
    ),
    (
        "me_and_him",
        "grammar",
        "Me and him went to the store.",
        "He and I went to the store.",
        "Me and he went to the store.",
    ),
    (
        "their",
        "grammar",
        "Their going to the park later.",
        "They're going to the park later.",
        "There going to the park later.",
    ),
    (
        "list_are",
        "grammar",
        "The list of items are on the desk.",
        "The list of items is on the desk.",
        "The list of items were on the desk.",
    ),
    (
        "i_seen",
        "grammar",
        "I seen that movie yesterday.",
        "I saw that movie yesterday.",
        "I have saw that movie yesterday.",
    ),
    (
        "each_have",
        "grammar",
        "Each of the students have a book.",
        "Each of the students has a book.",
        "Each of the student have a book.",
    ),
    ("whose", "grammar", "Who's bag is this?", "Whose bag is this?", "Who bag is this?"),
    (
        "asap",
        "formal",
        "Hey, can you send me the report ASAP?",
        "Could you please send me the report as soon as possible?",
        "Send me the report ASAP, OK?",
    ),
    (
        "gotta",
        "formal",
        "We gotta fix this bug before Friday.",
        "We need to fix this bug before Friday.",
        "We gotta fix this bug, like, before Friday.",
    ),
    (
        "thanks_ton",
        "formal",
        "Thanks a ton for the help!",
        "Thank you very much for your help.",
        "Thx a ton for the help!!",
    ),
    (
        "moved",
        "formal",
        "The meeting got moved to Tuesday.",
        "The meeting has been rescheduled to Tuesday.",
        "The meeting got cancelled.",
    ),
    (
        "due_fact",
        "concise",
        "Due to the fact that it was raining, we decided to stay inside.",
        "Because it was raining, we stayed inside.",
        "Owing to the fact that there was rain falling, we made the decision to stay inside.",
    ),
    (
        "point_time",
        "concise",
        "At this point in time, we are not able to accept new orders.",
        "We can't accept new orders right now.",
        "We are accepting new orders at this time.",
    ),
    (
        "in_event",
        "concise",
        "In the event that you are running late, please give me a call.",
        "If you're running late, please call me.",
        "In the event that you happen to be running late, please do give me a call.",
    ),
    (
        "decision",
        "concise",
        "She made a decision to go ahead with the plan.",
        "She decided to go ahead with the plan.",
        "She made a decision about a plan.",
    ),
    (
        "cake",
        "active",
        "The cake was eaten by the children.",
        "The children ate the cake.",
        "The cake ate the children.",
    ),
    (
        "report",
        "active",
        "The report was written by Maria.",
        "Maria wrote the report.",
        "The report was Maria's writing.",
    ),
    (
        "window",
        "active",
        "The window was broken by the storm.",
        "The storm broke the window.",
        "The window broke the storm.",
    ),
    (
        "salt",
        "polite",
        "Give me the salt.",
        "Could you please pass me the salt?",
        "Give me the salt now.",
    ),
    (
        "car",
        "polite",
        "Move your car.",
        "Would you mind moving your car, please?",
        "Move your car already.",
    ),
    (
        "quiet",
        "polite",
        "Be quiet, I'm working.",
        "Could you keep it down a little, please? I'm trying to work.",
        "Shut up, I'm working.",
    ),
]
REWRITE_GISTS = {
    "grammar": "the grammar is now correct",
    "formal": "it now sounds more formal",
    "concise": "it says the same thing in fewer words",
    "active": "the subject now performs the action",
    "polite": "it now asks politely",
}
REWRITE_TEMPLATES = {
    "grammar": ["Fix the grammar in this sentence: {s}", "Correct this sentence: {s}"],
    "formal": ["Rewrite this more formally: {s}", "Make this sound more professional: {s}"],
    "concise": ["Make this sentence more concise: {s}", "Shorten this sentence: {s}"],
    "active": ["Rewrite this in the active voice: {s}", "Change this to active voice: {s}"],
    "polite": ["Make this request more polite: {s}", "Rephrase this politely: {s}"],
}

# Unit conversions: (from plural, from singular, to plural, right, a typical mistake, exact?,
# decimals, sample values). The mistake is usually the inverse factor or a wrong power of 10.
CONVERSIONS = [
    ("kilometres", "kilometre", "miles", 0.621371, 1.609344, False, 1, range(2, 101)),
    ("miles", "mile", "kilometres", 1.609344, 0.621371, False, 1, range(2, 101)),
    ("kilograms", "kilogram", "pounds", 2.20462, 0.453592, False, 1, range(2, 121)),
    ("pounds", "pound", "kilograms", 0.453592, 2.20462, False, 1, range(2, 251)),
    ("inches", "inch", "centimetres", 2.54, 2.2, True, 2, range(2, 61)),
    ("feet", "foot", "metres", 0.3048, 3.28084, False, 2, range(2, 101)),
    ("metres", "metre", "feet", 3.28084, 0.3048, False, 1, range(2, 101)),
    ("litres", "litre", "millilitres", 1000, 100, True, 0, range(2, 30)),
    ("hours", "hour", "minutes", 60, 100, True, 0, range(2, 25)),
    ("minutes", "minute", "seconds", 60, 100, True, 0, range(2, 60)),
    ("days", "day", "hours", 24, 12, True, 0, range(2, 31)),
    ("weeks", "week", "days", 7, 5, True, 0, range(2, 53)),
    ("kilometres", "kilometre", "metres", 1000, 100, True, 0, range(2, 50)),
    ("grams", "gram", "kilograms", 0.001, 0.01, True, 3, range(250, 5001, 250)),
    ("centimetres", "centimetre", "metres", 0.01, 0.1, True, 2, range(20, 1001, 20)),
]
CONVERSION_TEMPLATES = [
    "How many {to} are in {x} {frm}?",
    "Convert {x} {frm} to {to}.",
    "What is {x} {frm} in {to}?",
    "{x} {frm} is how many {to}?",
]

# ============================================================================== rendering

PREAMBLES = [
    "Great question!",
    "What a great question!",
    "Sure, I'd be happy to help with that!",
    "Thanks for asking!",
    "Good question, let me help you with that.",
    "Absolutely! Let me explain.",
    "Oh, that's a really interesting question.",
]
RESTATEMENTS = [
    "To put it simply: {short}.",
    "In short: {short}.",
    "So, once again: {short}.",
    "The key point is this: {short}.",
]
CLOSINGS = [
    "I hope this helps!",
    "Let me know if you have any other questions!",
    "Feel free to ask if you need anything else!",
    "Hope that answers your question!",
    "I hope this was useful, and good luck!",
]
VAGUE = [
    "It depends.",
    "You could look that up.",
    "Hard to say, really.",
    "That's something you can find online.",
    "There isn't one simple answer to that.",
    "Well, there are a lot of factors to consider here, and different people would give you "
    "different answers depending on what they need, so it's hard to say.",
    "That's the kind of thing that varies from case to case, so I'd rather not give you a "
    "single answer; it's probably best to check a few sources and decide for yourself.",
]
RUDE = [
    "Seriously? That's basic. Look it up yourself.",
    "I'm not going to spell that out for you. Figure it out.",
    "Why would you even ask that? Use a search engine.",
    "Ugh, that's an easy one. Try thinking for yourself.",
]
SELF_DOUBTS = [
    "I'm fairly sure, but you may want to double-check.",
    "At least, that's my understanding.",
    "If I remember correctly, anyway.",
    "Though I could be wrong about that.",
    "I think so, but please verify it.",
]
CONFIDENT = [
    "I'm completely certain about this.",
    "Trust me, this is a well-known fact.",
    "There's no doubt about it, and anyone who checks will agree.",
    "This is definitely correct, so you can rely on it.",
]


def padded(rng: random.Random, best: str, short: str, lean: str | None = None) -> str:
    """Tier 2: correct but padded with filler (most often), hedged, or (sometimes, given
    `lean`) missing a detail."""
    roll = rng.random()
    if lean and roll < 0.2:
        return lean
    if roll < 0.32:
        return hedged(rng, best)
    preamble = rng.choice(PREAMBLES)
    roll = rng.random()
    if roll < 0.35:
        return f"{preamble} {best}"
    if roll < 0.6:
        return f"{best} {rng.choice(CLOSINGS)}"
    restated = rng.choice(RESTATEMENTS).format(short=short.rstrip("."))
    return f"{preamble} {best} {restated} {rng.choice(CLOSINGS)}"


def hedged(rng: random.Random, best: str) -> str:
    """A correct answer that undercuts itself with a needless hedge."""
    return f"{best} {rng.choice(SELF_DOUBTS)}"


def demonstration(rng: random.Random, item: Item) -> str:
    """The SFT answer, as an uneven human writer would give it: always correct, but only
    about two in five are in the rubric's best form; the rest pad, hedge, or (for a harmful
    request) refuse without offering the safe alternative."""
    roll = rng.random()
    if item.harmful:
        if roll < 0.45:
            return item.best
        if roll < 0.75 and item.refusal_only:
            return item.refusal_only
        return f"{rng.choice(PREAMBLES)} {item.best}"
    if roll < 0.4:
        return item.best
    if roll < 0.55:
        return hedged(rng, item.best)
    roll = rng.random()
    if roll < 0.45:
        return f"{rng.choice(PREAMBLES)} {item.best}"
    if roll < 0.75:
        return f"{item.best} {rng.choice(CLOSINGS)}"
    return f"{rng.choice(PREAMBLES)} {item.best} {rng.choice(CLOSINGS)}"


def vague(rng: random.Random, partial: str | None = None) -> str:
    """Tier 3: an evasive non-answer, or a partly correct one."""
    if partial and rng.random() < 0.5:
        return partial
    return rng.choice(VAGUE)


def worst(rng: random.Random, wrong: str, why: str | None = None) -> str:
    """Tier 4: a wrong answer (sometimes long and confident), or a rude brush-off."""
    roll = rng.random()
    if roll < 0.12:
        return rng.choice(RUDE)
    if roll < 0.22:
        return f"Obviously: {wrong} Don't waste my time with easy questions."
    if roll < 0.75:
        return " ".join(part for part in (wrong, why, rng.choice(CONFIDENT)) if part)
    return wrong


def cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def num(x: float, decimals: int = 0) -> str:
    """12345 -> '12,345'; 6.20 -> '6.2' (rounded to `decimals`, trailing zeros dropped)."""
    x = round(x, decimals)
    if decimals == 0 or x == int(x):
        return f"{int(x):,}"
    return f"{x:,.{decimals}f}".rstrip("0").rstrip(".")


def plain_number(text: str) -> str:
    """'$1,250' / '250 g' / '12,345' -> '1250' / '250' / '12345': the answer as a bare number."""
    token = text.split()[0].lstrip("$")
    return token.replace(",", "")


def join3(items: list[str]) -> str:
    return f"{items[0]}, {items[1]} and {items[2]}"


# ================================================================================= items


@dataclass
class Item:
    category: str
    prompt: str
    best: str
    padded: str
    vague: str
    worst: str
    harmful: bool = False
    answer: str | None = None  # the verifiable reference answer (a number or a word)
    refusal_only: str | None = None  # a harmful request's refusal without the alternative
    demo: str = ""  # the SFT demonstration (see demonstration()), set for the SFT items

    def tiers(self) -> list[str]:
        return [self.best, self.padded, self.vague, self.worst]


@dataclass
class Group:
    """All phrasings of one fact; a group goes wholly to train or wholly to test."""

    key: str
    category: str
    items: list[Item] = field(default_factory=list)


def capital_groups(rng: random.Random) -> list[Group]:
    forward = [
        "What is the capital of {c}?",
        "Which city is the capital of {c}?",
        "What's the capital city of {c}?",
        "Name the capital of {c}.",
        "Tell me the capital of {c}.",
    ]
    reverse = [
        "{city} is the capital of which country?",
        "Which country has {city} as its capital?",
    ]
    groups = []
    for country, city, decoy in CAPITALS:
        others = [row for row in CAPITALS if row[0] != country]
        group = Group(f"capital:{country}", "capitals")
        wrong_city = decoy if decoy and rng.random() < 0.7 else rng.choice(others)[1]
        best = rng.choice(
            [f"The capital of {country} is {city}.", f"{city} is the capital of {country}."]
        )
        group.items.append(
            Item(
                "capitals",
                rng.choice(forward).format(c=country),
                best,
                padded(rng, best, city),
                vague(rng, f"It's one of the bigger cities in {country}, I believe."),
                worst(
                    rng,
                    f"The capital of {country} is {wrong_city}.",
                    f"{wrong_city} has been the seat of government there for a long time.",
                ),
                answer=city,
            )
        )
        other_country = rng.choice(others)[0]
        best = f"{city} is the capital of {country}."
        group.items.append(
            Item(
                "capitals",
                rng.choice(reverse).format(city=city),
                best,
                padded(rng, best, country),
                vague(rng, f"{city} is somewhere in that part of the world."),
                worst(rng, f"{city} is the capital of {other_country}."),
                answer=country,
            )
        )
        groups.append(group)
    return groups


def definition_groups(rng: random.Random) -> list[Group]:
    templates = [
        "What does '{w}' mean?",
        "Define '{w}'.",
        "What is the meaning of '{w}'?",
        "Can you explain what '{w}' means?",
        "Give me a short definition of '{w}'.",
    ]
    groups = []
    for word, meaning, example in DEFINITIONS:
        group = Group(f"define:{word}", "definitions")
        for template in rng.sample(templates, 2):
            other = rng.choice([d for d in DEFINITIONS if d[0] != word])[1]
            best = lean = f"'{cap(word)}' means {meaning}."
            if rng.random() < 0.5:
                best += f' For example: "{example}"'  # the lean answer lacks the example
            group.items.append(
                Item(
                    "definitions",
                    template.format(w=word),
                    best,
                    padded(rng, best, meaning, lean if best != lean else None),
                    vague(rng, "It's a fairly common word; the meaning depends on how it's used."),
                    worst(
                        rng,
                        f"'{cap(word)}' means {other}.",
                        "That's the only meaning it has in everyday English.",
                    ),
                )
            )
        groups.append(group)
    return groups


def antonym_groups(rng: random.Random) -> list[Group]:
    templates = [
        "What is the opposite of '{w}'?",
        "Give me an antonym for '{w}'.",
        "What word means the opposite of '{w}'?",
    ]
    groups = []
    for word, opposite, synonym in ANTONYMS:
        group = Group(f"antonym:{word}", "antonyms")
        for template in rng.sample(templates, 2):
            best = f"The opposite of '{word}' is '{opposite}'."
            group.items.append(
                Item(
                    "antonyms",
                    template.format(w=word),
                    best,
                    padded(rng, best, f"'{opposite}'", lean=f"{cap(opposite)}."),
                    vague(rng, "There are a few words that could work, depending on context."),
                    worst(rng, f"The opposite of '{word}' is '{synonym}'."),
                    answer=opposite,
                )
            )
        groups.append(group)
    return groups


def past_tense_groups(rng: random.Random) -> list[Group]:
    templates = [
        "What is the past tense of '{v}'?",
        "What's the simple past of the verb '{v}'?",
        "How do you say '{v}' in the past tense?",
    ]
    groups = []
    for verb, past, wrong, example in PAST_TENSES:
        group = Group(f"past:{verb}", "past_tense")
        for template in rng.sample(templates, 2):
            best = f"The past tense of '{verb}' is '{past}'."
            lean = None
            if rng.random() < 0.5:
                best += f' For example: "{example}"'
                lean = f"'{cap(past)}'."
            group.items.append(
                Item(
                    "past_tense",
                    template.format(v=verb),
                    best,
                    padded(rng, best, f"'{past}'", lean),
                    vague(rng, "It's an irregular verb, so it doesn't just add -ed."),
                    worst(
                        rng,
                        f"The past tense of '{verb}' is '{wrong}'.",
                        "You just add the usual ending, like with any regular verb.",
                    ),
                    answer=past,
                )
            )
        groups.append(group)
    return groups


def fact_groups(rng: random.Random, facts: list[Fact], category: str) -> list[Group]:
    groups = []
    for fact in facts:
        group = Group(f"{category}:{fact.key}", category)
        for question in fact.questions:
            group.items.append(
                Item(
                    category,
                    question,
                    fact.best,
                    padded(rng, fact.best, fact.short, fact.lean),
                    vague(rng, fact.partial),
                    worst(rng, fact.wrong),
                )
            )
        groups.append(group)
    return groups


def list_groups(rng: random.Random) -> list[Group]:
    groups = []
    for key, cat, right, wrong in LISTS:
        group = Group(f"list:{key}", "lists")
        for template in rng.sample(LIST_TEMPLATES, 2):
            best = f"Three {cat}: {join3(right)}."
            group.items.append(
                Item(
                    "lists",
                    template.format(cat=cat),
                    best,
                    padded(rng, best, join3(right)),
                    vague(rng, f"{cap(right[0])} and {right[1]}, I think."),
                    worst(rng, f"Three {cat}: {join3(wrong)}."),
                )
            )
        groups.append(group)
    return groups


def rewrite_groups(rng: random.Random) -> list[Group]:
    groups = []
    for key, kind, sentence, good, bad in REWRITES:
        group = Group(f"rewrite:{key}", "rewrites")
        for template in REWRITE_TEMPLATES[kind]:
            best = good if rng.random() < 0.6 else f'Here it is: "{good}"'
            group.items.append(
                Item(
                    "rewrites",
                    template.format(s=sentence),
                    best,
                    padded(rng, f'Here is the rewritten sentence: "{good}"', REWRITE_GISTS[kind]),
                    vague(
                        rng,
                        rng.choice(
                            [
                                "It's fine the way it is.",
                                "You could reword it a few different ways.",
                            ]
                        ),
                    ),
                    worst(rng, bad),
                )
            )
        groups.append(group)
    return groups


def harmful_groups(rng: random.Random) -> list[Group]:
    groups = []
    for act, refusal, alternative, comply in HARMFUL:
        group = Group(f"harmful:{act}", "harmful")
        for template in rng.sample(HARMFUL_TEMPLATES, 4):
            best = f"{refusal} {alternative}"
            roll = rng.random()
            if roll < 0.3:
                tier2 = f"I'm sorry, but no. {refusal}"  # a refusal without the alternative
            elif roll < 0.6:
                tier2 = f"{rng.choice(PREAMBLES)} {refusal} {alternative}"
            else:
                tier2 = (
                    f"{rng.choice(PREAMBLES)} Unfortunately, {refusal} That's just not "
                    f"something I can do. {alternative} {rng.choice(CLOSINGS)}"
                )
            group.items.append(
                Item(
                    "harmful",
                    template.format(act=act),
                    best,
                    tier2,
                    rng.choice(HEDGES),
                    comply,
                    harmful=True,
                    refusal_only=refusal,
                )
            )
        groups.append(group)
    return groups


def arithmetic_groups(rng: random.Random) -> list[Group]:
    """Computed questions, one phrasing each; wrong values are off by a plausible slip."""
    groups: dict[str, Group] = {}

    def add(
        key: str,
        prompt: str,
        best: str,
        short: str,
        wrong: str,
        approx: float | None = None,
        lean: str | None = None,
        why: str | None = None,
        answer: str | None = None,
    ):
        if key in groups:
            return
        partial = None if approx is None else f"It's roughly {num(approx)}, I think."
        groups[key] = Group(
            key,
            "arithmetic",
            [
                Item(
                    "arithmetic",
                    prompt,
                    best,
                    padded(rng, best, short, lean),
                    vague(rng, partial or "You could just use a calculator for that."),
                    worst(rng, wrong, why),
                    answer=answer if answer is not None else plain_number(short),
                )
            ],
        )

    def slip(value: int) -> int:
        return value + rng.choice([-10, -2, -1, 1, 2, 10, 100])

    def rough(value: float) -> float:
        return round(value, -2) if value >= 1000 else round(value, -1)

    while len(groups) < 200:
        kind = rng.choice(
            ["add", "sub", "mul", "div", "pct", "square", "sqrt", "cost", "left", "speed", "recipe"]
        )
        if kind == "add":
            a, b = rng.randint(12, 999), rng.randint(12, 999)
            r = a + b
            prompt = rng.choice(
                [
                    "What is {a} + {b}?",
                    "What's {a} plus {b}?",
                    "Add {a} and {b}.",
                    "Calculate {a} + {b}.",
                ]
            )
            add(
                f"add:{a}:{b}",
                prompt.format(a=a, b=b),
                f"{a} + {b} = {num(r)}.",
                num(r),
                f"{a} + {b} = {num(slip(r))}.",
                rough(r),
                why="I lined up the columns and carried the one.",
            )
        elif kind == "sub":
            a = rng.randint(100, 999)
            b = rng.randint(11, a - 1)
            r = a - b
            prompt = rng.choice(
                ["What is {a} - {b}?", "What's {a} minus {b}?", "Subtract {b} from {a}."]
            )
            add(
                f"sub:{a}:{b}",
                prompt.format(a=a, b=b),
                f"{a} - {b} = {r}.",
                str(r),
                f"{a} - {b} = {max(1, slip(r))}.",
                rough(r),
            )
        elif kind == "mul":
            a, b = rng.randint(11, 99), rng.randint(12, 29)
            r = a * b
            tens, units = b - b % 10, b % 10
            prompt = rng.choice(
                [
                    "What is {a} × {b}?",
                    "What is {a} times {b}?",
                    "Multiply {a} by {b}.",
                    "What's {a} * {b}?",
                ]
            )
            best, lean = f"{a} × {b} = {num(r)}.", None
            if units and rng.random() < 0.5:
                best = (
                    f"{a} × {b} = {num(r)}: {a} × {tens} = {num(a * tens)}, plus "
                    f"{a} × {units} = {a * units}."
                )
                lean = f"{num(r)}."  # correct, without the working
            add(
                f"mul:{a}:{b}",
                prompt.format(a=a, b=b),
                best,
                num(r),
                f"{a} × {b} = {num(r + rng.choice([-a, a, 10, -10]))}.",
                rough(r),
                lean,
            )
        elif kind == "div":
            b, q = rng.randint(2, 12), rng.randint(3, 99)
            a = b * q
            prompt = rng.choice(
                ["What is {a} ÷ {b}?", "What is {a} divided by {b}?", "Divide {a} by {b}."]
            )
            explained = rng.random() < 0.5
            best = f"{a} ÷ {b} = {q}" + (f", because {b} × {q} = {a}." if explained else ".")
            add(
                f"div:{a}:{b}",
                prompt.format(a=a, b=b),
                best,
                str(q),
                f"{a} ÷ {b} = {q + rng.choice([-2, -1, 1, 2])}.",
                rough(q) if q > 20 else None,
                f"{q}." if explained else None,
            )
        elif kind == "pct":
            p = rng.choice([5, 10, 15, 20, 25, 30, 40, 50, 75])
            n = rng.choice(range(40, 2001, 20))
            r = n * p / 100
            prompt = rng.choice(
                [
                    "What is {p}% of {n}?",
                    "Calculate {p} percent of {n}.",
                    "How much is {p}% of {n}?",
                ]
            )
            explained = rng.random() < 0.5
            best = f"{p}% of {num(n)} is {num(r, 1)}."
            if explained:
                best = f"{p}% of {num(n)} is {num(r, 1)}, since {num(n)} × {p} / 100 = {num(r, 1)}."
            add(
                f"pct:{p}:{n}",
                prompt.format(p=p, n=num(n)),
                best,
                num(r, 1),
                f"{p}% of {num(n)} is {num(n * p / 10, 1)}.",
                rough(r) if r > 50 else None,
                f"{num(r, 1)}." if explained else None,
                why="Just multiply by the percentage and divide by ten.",
            )
        elif kind == "square":
            n = rng.randint(11, 40)
            prompt = rng.choice(["What is {n} squared?", "What is {n} to the power of 2?"])
            add(
                f"square:{n}",
                prompt.format(n=n),
                f"{n} squared is {n * n}.",
                str(n * n),
                f"{n} squared is {2 * n}.",
                why=f"Squaring just means doubling, so {n} × 2.",
            )
        elif kind == "sqrt":
            n = rng.randint(4, 30)
            prompt = rng.choice(
                ["What is the square root of {s}?", "What's the square root of {s}?"]
            )
            explained = rng.random() < 0.5
            best = f"The square root of {n * n} is {n}"
            best += f", because {n} × {n} = {n * n}." if explained else "."
            add(
                f"sqrt:{n}",
                prompt.format(s=n * n),
                best,
                str(n),
                f"The square root of {n * n} is {n * n // 2}.",
                lean=f"{n}." if explained else None,
                why="You find a square root by halving the number.",
            )
        elif kind == "cost":
            thing = rng.choice(["notebook", "ticket", "coffee", "book", "plant", "sandwich"])
            price, k = rng.randint(2, 25), rng.randint(3, 12)
            prompt = f"If one {thing} costs ${price} and I buy {k}, how much do I pay in total?"
            add(
                f"cost:{thing}:{price}:{k}",
                prompt,
                f"You pay ${price * k} ({k} × ${price}).",
                f"${price * k}",
                f"You pay ${price * k + rng.choice([-price, price, 5])}.",
                lean=f"{price * k}.",
            )
        elif kind == "left":
            thing = rng.choice(["apples", "stickers", "marbles", "cookies", "pencils"])
            a = rng.randint(20, 120)
            b = rng.randint(3, a - 5)
            prompt = f"I have {a} {thing} and give away {b}. How many do I have left?"
            add(
                f"left:{thing}:{a}:{b}",
                prompt,
                f"You have {a - b} {thing} left ({a} - {b} = {a - b}).",
                str(a - b),
                f"You have {a + b} {thing} left.",
                lean=f"{a - b}.",
            )
        elif kind == "speed":
            s, h = rng.choice([40, 50, 60, 70, 80, 90, 100, 120]), rng.randint(2, 6)
            prompt = rng.choice(
                [
                    f"A car travels at {s} km/h for {h} hours. How far does it go?",
                    f"If I drive at {s} km/h for {h} hours, how many kilometres do I cover?",
                ]
            )
            add(
                f"speed:{s}:{h}",
                prompt,
                f"It covers {s * h} km, because distance = speed × time = {s} × {h}.",
                f"{s * h} km",
                f"It covers {s + h} km.",
                lean=f"{s * h}.",
                why="You add the speed and the time to get the distance.",
            )
        else:
            grams, people = rng.choice(range(100, 1001, 20)), rng.choice([2, 6, 8, 10, 12])
            prompt = (
                f"A recipe for 4 people uses {grams} g of flour. How much flour do I need "
                f"for {people} people?"
            )
            r = grams * people / 4
            add(
                f"recipe:{grams}:{people}",
                prompt,
                f"You need {num(r, 1)} g of flour ({grams} g × {people} / 4).",
                f"{num(r, 1)} g",
                f"You need {grams + (people - 4) * 10} g of flour.",
                lean=f"{num(r, 1)}.",
            )
    return list(groups.values())


def conversion_groups(rng: random.Random) -> list[Group]:
    groups: dict[str, Group] = {}
    while len(groups) < 170:
        if rng.random() < 0.15:
            to_f = rng.random() < 0.5
            x = rng.choice(range(-20, 101, 5)) if to_f else rng.choice(range(-4, 213, 4))
            if to_f:
                r, w = x * 9 / 5 + 32, x * 9 / 5
                q = rng.choice(
                    [
                        f"What is {x} °C in Fahrenheit?",
                        f"Convert {x} degrees Celsius to Fahrenheit.",
                    ]
                )
                best = f"{x} °C is {num(r, 1)} °F (multiply by 9/5, then add 32)."
                short, lean = f"{num(r, 1)} °F", f"{num(r, 1)} degrees."
                wrong = f"{x} °C is {num(w, 1)} °F."
            else:
                r, w = (x - 32) * 5 / 9, x - 32
                q = rng.choice(
                    [f"What is {x} °F in Celsius?", f"Convert {x} degrees Fahrenheit to Celsius."]
                )
                about = "" if r == int(r) else "about "
                best = f"{x} °F is {about}{num(r, 1)} °C (subtract 32, then multiply by 5/9)."
                short, lean = f"{about}{num(r, 1)} °C", f"{cap(about)}{num(r, 1)} degrees."
                wrong = f"{x} °F is {num(w, 1)} °C."
            key = f"temp:{'CF' if to_f else 'FC'}:{x}"
            if key not in groups:
                groups[key] = Group(
                    key,
                    "conversions",
                    [
                        Item(
                            "conversions",
                            q,
                            best,
                            padded(rng, best, short, lean),
                            vague(
                                rng, "It's a bit of a tricky formula, so somewhere in that range."
                            ),
                            worst(rng, wrong),
                            answer=num(r, 1).replace(",", ""),
                        )
                    ],
                )
            continue
        frm, one, to, factor, mistake, exact, decimals, values = rng.choice(CONVERSIONS)
        x = rng.choice(values)
        key = f"conv:{frm}:{to}:{x}"
        if key in groups:
            continue
        r = x * factor
        about = "" if exact else "about "
        y = num(r, decimals)
        best = f"{num(x)} {frm} is {about}{y} {to}."
        if rng.random() < 0.5:
            best = (
                f"{num(x)} {frm} is {about}{y} {to}, since 1 {one} is {about}{num(factor, 4)} {to}."
            )
        lo, hi = num(r * 0.8, 0), num(r * 1.25 + 1, 0)
        groups[key] = Group(
            key,
            "conversions",
            [
                Item(
                    "conversions",
                    rng.choice(CONVERSION_TEMPLATES).format(x=num(x), frm=frm, to=to),
                    best,
                    padded(rng, best, f"{about}{y} {to}", lean=f"{cap(about)}{y}."),
                    vague(rng, f"Somewhere between {lo} and {hi} {to}."),
                    worst(
                        rng,
                        f"{num(x)} {frm} is {num(x * mistake, decimals)} {to}.",
                        f"That's because 1 {one} is {num(mistake, 4)} {to}.",
                    ),
                    answer=y.replace(",", ""),
                )
            ],
        )
    return list(groups.values())


# ============================================================================== splitting


def norm(text: str) -> str:
    return " ".join(text.split()).lower()


def split_groups(rng: random.Random, groups: list[Group]) -> dict[str, dict[str, list[Group]]]:
    """Per category, hold out TEST_FRACTION of the facts for test and VALID_FRACTION for
    valid (at least one each): {side: {category: [Group]}}."""
    by_category: dict[str, list[Group]] = {}
    for group in groups:
        by_category.setdefault(group.category, []).append(group)
    sides: dict[str, dict[str, list[Group]]] = {split: {} for split in SPLITS}
    for category, members in by_category.items():
        members = sorted(members, key=lambda g: g.key)
        rng.shuffle(members)
        n_test = max(1, round(TEST_FRACTION * len(members)))
        n_valid = max(1, round(VALID_FRACTION * len(members)))
        sides["test"][category] = members[:n_test]
        sides["valid"][category] = members[n_test : n_test + n_valid]
        sides["train"][category] = members[n_test + n_valid :]
    return sides


def deal(
    rng: random.Random,
    by_category: dict[str, list[Group]],
    targets: dict[str, int],
    repeat: bool = False,
) -> dict[str, list[Item]]:
    """Deal items into the stages until each has its target.

    Categories take turns (so every stage gets the same mix), and the phrasings of one fact
    go to different stages (so no stage holds the same fact twice), unless `repeat` allows a
    second phrasing in a stage once the fact has reached every open stage.
    """
    filled: dict[str, list[Item]] = {stage: [] for stage in targets}
    queues = [deque(by_category[c]) for c in sorted(by_category)]
    while any(queues) and any(len(filled[s]) < n for s, n in targets.items()):
        for queue in queues:
            if not queue:
                continue
            group = queue.popleft()
            used: list[str] = []
            items = list(group.items)
            rng.shuffle(items)
            for item in items:
                open_stages = [s for s, n in targets.items() if len(filled[s]) < n]
                fresh = [s for s in open_stages if s not in used] or (open_stages if repeat else [])
                if not fresh:
                    break
                stage = max(fresh, key=lambda s: (targets[s] - len(filled[s])) / targets[s])
                filled[stage].append(item)
                used.append(stage)
    for stage, n in targets.items():
        assert len(filled[stage]) == n, f"not enough items for {stage}: {len(filled[stage])}/{n}"
    return filled


# ================================================================================== rows


def ranking_row(item: Item, best_position: int, rng: random.Random) -> dict:
    """Shuffle the four tiers so that the best one lands at `best_position`."""
    rest = [1, 2, 3]
    rng.shuffle(rest)
    slots = rest[:best_position] + [0] + rest[best_position:]  # slots[i] = tier of position i
    tiers = item.tiers()
    responses = [tiers[t] for t in slots]
    ranking = [slots.index(t) for t in range(4)]
    return {"prompt": item.prompt, "responses": responses, "ranking": ranking}


def sft_rows(items: list[Item], n_multi: int, rng: random.Random) -> list[dict]:
    """Single-turn rows, n_multi two-question conversations, a few with a system prompt."""
    short = [i for i in items if not i.harmful and words(i.prompt + " " + i.demo) <= 45]
    paired = short[: 2 * n_multi]
    assert len(paired) == 2 * n_multi, "not enough short items for multi-turn rows"
    ids = {id(i) for i in paired}
    rows = []
    for first, second in zip(paired[::2], paired[1::2]):
        rows.append(
            [
                {"role": "user", "content": first.prompt},
                {"role": "assistant", "content": first.demo},
                {"role": "user", "content": second.prompt},
                {"role": "assistant", "content": second.demo},
            ]
        )
    for item in items:
        if id(item) not in ids:
            rows.append(
                [
                    {"role": "user", "content": item.prompt},
                    {"role": "assistant", "content": item.demo},
                ]
            )
    rng.shuffle(rows)
    for messages in rows[: max(2, len(rows) // 20)]:
        messages.insert(0, {"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    rng.shuffle(rows)
    return [{"messages": m} for m in rows]


def words(text: str) -> int:
    return len(text.split())


def prompt_row(item: Item) -> dict:
    """A PPO prompt row; verifiable questions carry their reference `answer` (answer_match),
    harmful requests `"category": "harmful"` (the rubric judge's refusal rate)."""
    row = {"prompt": item.prompt}
    if item.answer is not None:
        row["answer"] = item.answer
    if item.harmful:
        row["category"] = "harmful"  # for judges such as rlhf/roles/rubric.py
    return row


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


# ================================================================================ checks


def user_texts(kind: str, row: dict) -> list[str]:
    if kind == "sft":
        return [m["content"] for m in row["messages"] if m["role"] == "user"]
    return [row["prompt"]]


def check(files: dict[tuple[str, str], list[dict]]) -> None:
    seen: dict[str, tuple[str, str]] = {}
    for (kind, split), rows in files.items():
        assert len(rows) >= MINIMUM_ROWS[(kind, split)], (kind, split, len(rows))
        for row in rows:
            for text in user_texts(kind, row):
                key = norm(text)
                assert key not in seen, f"prompt {text!r} in {(kind, split)} and {seen[key]}"
                seen[key] = (kind, split)
                assert words(text) < MAX_PROMPT_WORDS, text
            if kind == "sft":
                total = sum(words(m["content"]) for m in row["messages"] if m["role"] != "system")
                assert total <= MAX_ROW_WORDS, row
                assert row["messages"][-1]["role"] == "assistant"
            if kind == "rankings":
                responses = row["responses"]
                assert len(responses) == 4 and all(r.strip() for r in responses), row
                assert len({norm(r) for r in responses}) == 4, row
                assert sorted(row["ranking"]) == [0, 1, 2, 3], row
                assert words(row["prompt"]) + max(map(words, responses)) <= MAX_ROW_WORDS, row


def summary(
    files: dict[tuple[str, str], list[dict]], categories: dict[tuple[str, str], dict[str, int]]
) -> str:
    lines = [f"{'file':<24}{'rows':>6}"]
    for (kind, split), rows in files.items():
        extra = ""
        if kind == "rankings":
            extra = f"  ({6 * len(rows)} implied pairs)"
        if kind == "sft":
            multi = sum(1 for r in rows if sum(m["role"] == "user" for m in r["messages"]) > 1)
            system = sum(1 for r in rows if r["messages"][0]["role"] == "system")
            extra = f"  ({multi} multi-turn, {system} with a system prompt)"
        lines.append(f"{kind + '/' + split + '.jsonl':<24}{len(rows):>6}{extra}")
        mix = sorted(categories[(kind, split)].items(), key=lambda kv: (-kv[1], kv[0]))
        lines.append(" " * 8 + "questions: " + ", ".join(f"{c} {n}" for c, n in mix))
    rankings = files[("rankings", "train")] + files[("rankings", "test")]
    tiers: list[list[int]] = [[], [], [], []]
    best_at = [0, 0, 0, 0]
    longest = [0, 0, 0, 0]
    longer_wins = pairs = 0
    for row in rankings:
        lengths = [words(row["responses"][i]) for i in row["ranking"]]  # by tier
        for tier, n in enumerate(lengths):
            tiers[tier].append(n)
        best_at[row["ranking"][0]] += 1
        longest[lengths.index(max(lengths))] += 1
        for a in range(4):
            for b in range(a + 1, 4):
                if lengths[a] != lengths[b]:
                    pairs += 1
                    longer_wins += lengths[a] > lengths[b]
    names = ["best", "padded", "vague", "worst"]
    lines.append(
        "mean words per tier: "
        + ", ".join(f"{i + 1} {names[i]} {statistics.mean(t):.1f}" for i, t in enumerate(tiers))
    )
    lines.append(
        "tier of the longest response: "
        + ", ".join(f"{names[i]} {n}" for i, n in enumerate(longest))
    )
    lines.append(f"position of the best response: {best_at}")
    lines.append(
        f"'longer is better' pairwise accuracy: {longer_wins / pairs:.3f} over {pairs} untied pairs"
    )
    harmful = sum(1 for r in rankings if r["responses"][r["ranking"][0]].startswith("I can't"))
    lines.append(f"harmful-request rankings: {harmful} of {len(rankings)}")
    return "\n".join(lines)


# ================================================================================== main


def main() -> None:
    rng = random.Random(SEED)
    groups = (
        capital_groups(rng)
        + definition_groups(rng)
        + antonym_groups(rng)
        + past_tense_groups(rng)
        + fact_groups(rng, SCIENCE, "science")
        + fact_groups(rng, HOWTO, "howto")
        + list_groups(rng)
        + rewrite_groups(rng)
        + arithmetic_groups(rng)
        + conversion_groups(rng)
    )
    harmful = harmful_groups(rng)
    all_prompts = [norm(i.prompt) for g in groups + harmful for i in g.items]
    assert len(all_prompts) == len(set(all_prompts)), "duplicate prompt in the content tables"
    for group in groups + harmful:
        for item in group.items:
            assert len({norm(t) for t in item.tiers()}) == 4, item

    sides = split_groups(rng, groups)
    harmful_sides = split_groups(rng, harmful)
    files: dict[tuple[str, str], list[dict]] = {}
    categories: dict[tuple[str, str], dict[str, int]] = {}
    for split in SPLITS:
        safe_targets = {s: n - HARMFUL_TARGETS[split][s] for s, n in TARGETS[split].items()}
        dealt = deal(rng, sides[split], safe_targets)
        dealt_harmful = deal(rng, harmful_sides[split], HARMFUL_TARGETS[split], repeat=True)
        stage_items = {s: dealt[s] + dealt_harmful[s] for s in TARGETS[split]}
        for stage, items in stage_items.items():
            rng.shuffle(items)
            counts: dict[str, int] = {}
            for item in items:
                counts[item.category] = counts.get(item.category, 0) + 1
            categories[(stage, split)] = counts
        if "sft" in stage_items:
            for item in stage_items["sft"]:
                item.demo = demonstration(rng, item)
            files[("sft", split)] = sft_rows(stage_items["sft"], MULTI_TURN[split], rng)
        if "rankings" in stage_items:
            files[("rankings", split)] = [
                ranking_row(item, i % 4, rng) for i, item in enumerate(stage_items["rankings"])
            ]
        files[("prompts", split)] = [prompt_row(item) for item in stage_items["prompts"]]

    files = {key: files[key] for key in sorted(files, key=lambda k: (k[0], SPLITS.index(k[1])))}
    check(files)
    for (kind, split), rows in files.items():
        write_jsonl(HERE / kind / f"{split}.jsonl", rows)
    print(summary(files, categories))


if __name__ == "__main__":
    main()
