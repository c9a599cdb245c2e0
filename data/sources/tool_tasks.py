"""Short tool-use traces, generated procedurally, with real Python tool back ends.

A record has the format of `agent`'s executed BFCL traces, so `agent.score_calls`
scores it:
    {"id": "tool_use/train/L0/3", "task": "tool_use", "category": "simple", "level": 0,
     "tools": [schema, ...],
     "accepted_calls": [{"name": "get_capital", "arguments": {"country": ["Peru"]}}],
     "ordered": False,
     "messages": [{"role": "system", "content": agent.SYSTEM_PREFIX + compact tools JSON},
                  {"role": "user", "content": "What is the capital of Peru?"},
                  {"role": "assistant", "content": '<tool_call>{"name": "get_capital", ...}</tool_call>'},
                  {"role": "tool", "content": "Lima"},
                  {"role": "assistant", "content": "The capital of Peru is Lima."}]}

Why: BFCL's schemas are long and diverse, and a sub-million-parameter model
trained on a few hundred of them learns the call format but never which name
and values to copy. These tasks are many, short and regular, and every
argument value appears literally in the question, so copying is learnable.

Levels: 0 = one tool in the schema, one call ('simple'); 1 = the right tool
among 3 ('multiple'); 2 = two independent requests in one question, answered
by two calls in ONE assistant turn, in any order, among 3 tools
('parallel_multiple'; the two may be the same tool with different values).
After the calls come one `tool` turn per call holding the real result of
running the tool (`execute_calls`), then a final assistant answer. At eval
time the model sees the system and user turns (`stage_data.eval_input`) and
its completion is the first assistant turn: all the calls.

Train and eval are disjoint by construction: a request (tool, question
template, argument values) belongs to eval when its hash falls in the eval
bucket, and every request of a record must belong to the record's split. So
no eval question, nor any part of a level-2 eval question, is ever asked in
train, whatever the sizes and seeds.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import math
import random
from collections.abc import Callable, Sequence

from data.sources import agent

SPLITS = ("train", "eval")
LEVELS = (0, 1, 2)
CATEGORIES = {0: "simple", 1: "multiple", 2: "parallel_multiple"}
# One request in this many goes to eval.
EVAL_BUCKETS = 8
# Draws from the other split (and repeats, when unique) are skipped; a split
# that runs out of distinct questions must stop rather than loop forever.
_MAX_DRAWS_PER_ITEM = 2000


def _stable_int(*parts) -> int:
  """A hash that is the same in every process (Python's hash() is salted)."""
  digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
  return int.from_bytes(digest[:8], "little")


def _compact(value) -> str:
  return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _result_text(result) -> str:
  """A result as a tool turn shows it: a string as it is, others as compact JSON."""
  return result if isinstance(result, str) else _compact(result)


def _num(x: float) -> int | float:
  """An int when whole, else rounded to 2 decimals: short, stable results."""
  return int(x) if float(x).is_integer() else round(x, 2)


# ---------------------------------------------------------- vocabularies ---

# city: (UTC offset, latitude, longitude)
CITIES = {
    "Paris": ("UTC+1", 48.86, 2.35), "London": ("UTC", 51.51, -0.13),
    "Tokyo": ("UTC+9", 35.68, 139.69), "Cairo": ("UTC+2", 30.04, 31.24),
    "Lima": ("UTC-5", -12.05, -77.04), "Oslo": ("UTC+1", 59.91, 10.75),
    "Rome": ("UTC+1", 41.90, 12.50), "Delhi": ("UTC+5:30", 28.61, 77.21),
    "Sydney": ("UTC+10", -33.87, 151.21), "Toronto": ("UTC-5", 43.65, -79.38),
    "Madrid": ("UTC+1", 40.42, -3.70), "Berlin": ("UTC+1", 52.52, 13.40),
    "Seoul": ("UTC+9", 37.57, 126.98), "Nairobi": ("UTC+3", -1.29, 36.82),
    "Dublin": ("UTC", 53.35, -6.26), "Lisbon": ("UTC", 38.72, -9.14),
    "Vienna": ("UTC+1", 48.21, 16.37), "Boston": ("UTC-5", 42.36, -71.06),
    "Denver": ("UTC-7", 39.74, -104.99), "Miami": ("UTC-5", 25.76, -80.19),
}
# country: (capital, population in millions)
COUNTRIES = {
    "France": ("Paris", 68), "Japan": ("Tokyo", 124), "Brazil": ("Brasilia", 203),
    "Egypt": ("Cairo", 105), "Canada": ("Ottawa", 40), "India": ("New Delhi", 1428),
    "Kenya": ("Nairobi", 55), "Peru": ("Lima", 34), "Norway": ("Oslo", 5.5),
    "Spain": ("Madrid", 48), "Italy": ("Rome", 59), "Mexico": ("Mexico City", 129),
    "Germany": ("Berlin", 84), "Chile": ("Santiago", 19.6), "Ghana": ("Accra", 34),
    "Nepal": ("Kathmandu", 30),
}
# Units of the currency per US dollar.
RATES = {"USD": 1.0, "EUR": 0.92, "GBP": 0.79, "JPY": 151.0, "CAD": 1.36, "INR": 83.0,
         "CHF": 0.9, "AUD": 1.52}
SYMBOLS = ("AAPL", "MSFT", "GOOG", "AMZN", "TSLA", "NVDA", "META", "IBM")
NAMES = ("Maria", "Ahmed", "Li", "Sofia", "Omar", "Emma", "Ravi", "Anna", "Tom", "Yuki",
         "Carlos", "Nina")
WORDS = ("lemon", "river", "planet", "garden", "window", "rocket", "silver", "pencil",
         "tiger", "castle", "orange", "summer", "bridge", "candle", "forest", "marble")
MESSAGES = ("see you at noon", "call me back", "running late", "happy birthday",
            "lunch is ready", "meeting moved", "good luck today", "thanks a lot")
# word: (French, Spanish, German, Italian)
LANGUAGES = ("French", "Spanish", "German", "Italian")
DICTIONARY = {
    "hello": ("bonjour", "hola", "hallo", "ciao"), "thanks": ("merci", "gracias", "danke", "grazie"),
    "water": ("eau", "agua", "wasser", "acqua"), "cat": ("chat", "gato", "katze", "gatto"),
    "dog": ("chien", "perro", "hund", "cane"), "house": ("maison", "casa", "haus", "casa"),
    "book": ("livre", "libro", "buch", "libro"), "bread": ("pain", "pan", "brot", "pane"),
}
SKIES = ("sunny", "cloudy", "rainy", "windy", "foggy")
SHAPES = ("rectangle", "triangle")


# ------------------------------------------------------------ back ends ---
# Real functions: a tool turn holds what they return. Fake-world values
# (weather, prices, bookings) come from a stable hash of the arguments, so
# the same question always gets the same answer.


def get_weather(city: str, unit: str) -> dict:
  celsius = _stable_int("temp", city) % 36 - 5
  temp = celsius if unit == "celsius" else round(celsius * 9 / 5 + 32)
  return {"temp": temp, "sky": SKIES[_stable_int("sky", city) % len(SKIES)]}


def get_time_zone(city: str) -> str:
  return CITIES[city][0]


def get_distance(origin: str, destination: str) -> int:
  """Great-circle distance in km (haversine)."""
  (_, lat1, lon1), (_, lat2, lon2) = CITIES[origin], CITIES[destination]
  p1, p2 = math.radians(lat1), math.radians(lat2)
  dp, dl = p2 - p1, math.radians(lon2 - lon1)
  h = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
  return round(2 * 6371 * math.asin(math.sqrt(h)))


def convert_currency(amount: float, src: str, dst: str) -> float:
  return _num(round(amount / RATES[src] * RATES[dst], 2))


def get_stock_price(symbol: str) -> float:
  return _num(50 + _stable_int("price", symbol) % 45000 / 100)


def add_numbers(a: float, b: float) -> float:
  return _num(a + b)


def subtract(a: float, b: float) -> float:
  return _num(a - b)


def multiply(a: float, b: float) -> float:
  return _num(a * b)


def power(base: int, exponent: int) -> int:
  return base ** exponent


def percent_of(percent: float, value: float) -> float:
  return _num(percent * value / 100)


def is_prime(n: int) -> bool:
  return n > 1 and all(n % d for d in range(2, math.isqrt(n) + 1))


def celsius_to_fahrenheit(celsius: float) -> float:
  return _num(celsius * 9 / 5 + 32)


def minutes_to_hours(minutes: int) -> dict:
  return {"hours": minutes // 60, "minutes": minutes % 60}


def compute_area(shape: str, width: float, height: float) -> float:
  if shape not in SHAPES:
    raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")
  return _num(width * height / (2 if shape == "triangle" else 1))


def set_alarm(hour: int, minute: int) -> dict:
  if not (0 <= hour < 24 and 0 <= minute < 60):
    raise ValueError(f"no such time {hour}:{minute}")
  return {"alarm": f"{hour:02d}:{minute:02d}", "set": True}


def send_message(recipient: str, text: str) -> dict:
  return {"sent": True, "id": _stable_int("message", recipient, text) % 9000 + 1000}


def word_count(text: str) -> int:
  return len(text.split())


def reverse_text(text: str) -> str:
  return text[::-1]


def to_upper(text: str) -> str:
  return text.upper()


def count_letter(text: str, letter: str) -> int:
  return text.count(letter)


def get_population(country: str) -> float:
  return COUNTRIES[country][1]


def get_capital(country: str) -> str:
  return COUNTRIES[country][0]


def days_between(start: str, end: str) -> int:
  return (datetime.date.fromisoformat(end) - datetime.date.fromisoformat(start)).days


def translate(word: str, language: str) -> str:
  return DICTIONARY[word][LANGUAGES.index(language)]


def book_flight(origin: str, destination: str, date: str) -> dict:
  key = _stable_int("flight", origin, destination, date)
  return {"flight": f"{origin[:2].upper()}{key % 900 + 100}", "price": 80 + key // 900 % 700}


# ---------------------------------------------------------------- tools ---


@dataclasses.dataclass(frozen=True)
class Tool:
  fn: Callable  # the back end; its name is the tool's name
  description: str
  params: tuple[tuple[str, str], ...]  # (argument, BFCL type), all required
  draw: Callable[[random.Random], dict]  # arguments, every value in the question
  questions: tuple[str, ...]  # templates over the arguments
  answer: Callable[[dict, object], str]  # (arguments, result) -> final answer

  @property
  def name(self) -> str:
    return self.fn.__name__

  def schema(self) -> dict:
    return {"name": self.name, "description": self.description,
            "parameters": {"type": "dict",
                           "properties": {p: {"type": t} for p, t in self.params},
                           "required": [p for p, _ in self.params]}}


def _date(rng: random.Random, year: int) -> datetime.date:
  return datetime.date(year, 1, 1) + datetime.timedelta(days=rng.randrange(365))


def _two_cities(rng: random.Random) -> dict:
  origin, destination = rng.sample(sorted(CITIES), 2)
  return {"origin": origin, "destination": destination}


def _days(rng: random.Random) -> dict:
  start = _date(rng, 2024)
  end = start + datetime.timedelta(days=rng.randint(1, 300))
  return {"start": start.isoformat(), "end": end.isoformat()}


def _letter_in_word(rng: random.Random) -> dict:
  text = rng.choice(WORDS)
  return {"text": text, "letter": rng.choice(sorted(set(text)))}


_S, _I, _F = "string", "integer", "float"

TOOLS: dict[str, Tool] = {t.name: t for t in (
    Tool(get_weather, "Current weather in a city.", (("city", _S), ("unit", _S)),
         lambda r: {"city": r.choice(sorted(CITIES)), "unit": r.choice(["celsius", "fahrenheit"])},
         ("What is the weather in {city} in {unit}?", "How warm is it in {city}, in {unit}?",
          "Weather for {city}, in {unit}, please."),
         lambda a, r: f"It is {r['temp']} degrees {a['unit']} and {r['sky']} in {a['city']}."),
    Tool(get_time_zone, "Time zone of a city.", (("city", _S),),
         lambda r: {"city": r.choice(sorted(CITIES))},
         ("Which time zone is {city} in?", "What is the time zone of {city}?",
          "Tell me the time zone for {city}."),
         lambda a, r: f"{a['city']} is in {r}."),
    Tool(get_distance, "Distance in km between two cities.",
         (("origin", _S), ("destination", _S)), _two_cities,
         ("How far is {origin} from {destination}?",
          "What is the distance from {origin} to {destination}?",
          "Distance between {origin} and {destination} in km?"),
         lambda a, r: f"{a['origin']} is {r} km from {a['destination']}."),
    Tool(convert_currency, "Convert money between currencies.",
         (("amount", _F), ("src", _S), ("dst", _S)),
         lambda r: {"amount": r.randint(5, 500), **dict(zip(("src", "dst"), r.sample(sorted(RATES), 2)))},
         ("Convert {amount} {src} to {dst}.", "How much is {amount} {src} in {dst}?",
          "What is {amount} {src} worth in {dst}?"),
         lambda a, r: f"{a['amount']} {a['src']} is {r} {a['dst']}."),
    Tool(get_stock_price, "Latest price of a stock.", (("symbol", _S),),
         lambda r: {"symbol": r.choice(SYMBOLS)},
         ("What is the price of {symbol} stock?", "How much is one {symbol} share?",
          "Get the stock price of {symbol}."),
         lambda a, r: f"{a['symbol']} trades at {r} dollars."),
    Tool(add_numbers, "Add two numbers.", (("a", _F), ("b", _F)),
         lambda r: {"a": r.randint(1, 999), "b": r.randint(1, 999)},
         ("What is {a} plus {b}?", "Add {a} and {b}.", "Compute the sum of {a} and {b}."),
         lambda a, r: f"{a['a']} + {a['b']} = {r}."),
    Tool(subtract, "Subtract b from a.", (("a", _F), ("b", _F)),
         lambda r: {"a": r.randint(1, 999), "b": r.randint(1, 999)},
         ("What is {a} minus {b}?", "Subtract {b} from {a}.", "Compute {a} take away {b}."),
         lambda a, r: f"{a['a']} - {a['b']} = {r}."),
    Tool(multiply, "Multiply two numbers.", (("a", _F), ("b", _F)),
         lambda r: {"a": r.randint(2, 99), "b": r.randint(2, 99)},
         ("What is {a} times {b}?", "Multiply {a} by {b}.", "Compute the product of {a} and {b}."),
         lambda a, r: f"{a['a']} * {a['b']} = {r}."),
    Tool(power, "Raise base to an exponent.", (("base", _I), ("exponent", _I)),
         lambda r: {"base": r.randint(2, 12), "exponent": r.randint(2, 5)},
         ("What is {base} to the power of {exponent}?", "Raise {base} to the power {exponent}.",
          "Compute {base} to the {exponent}th power."),
         lambda a, r: f"{a['base']} to the power {a['exponent']} is {r}."),
    Tool(percent_of, "A percentage of a value.", (("percent", _F), ("value", _F)),
         lambda r: {"percent": r.choice([5, 10, 15, 20, 25, 30, 40, 50, 75]),
                    "value": r.randint(10, 900)},
         ("What is {percent} percent of {value}?", "Take {percent}% of {value}.",
          "Find {percent} percent of {value}."),
         lambda a, r: f"{a['percent']}% of {a['value']} is {r}."),
    Tool(is_prime, "Check if a number is prime.", (("n", _I),),
         lambda r: {"n": r.randint(2, 300)},
         ("Is {n} a prime number?", "Check whether {n} is prime.", "Tell me if {n} is prime."),
         lambda a, r: f"{'Yes' if r else 'No'}, {a['n']} is {'' if r else 'not '}prime."),
    Tool(celsius_to_fahrenheit, "Convert Celsius to Fahrenheit.", (("celsius", _F),),
         lambda r: {"celsius": r.randint(-30, 100)},
         ("What is {celsius} Celsius in Fahrenheit?", "Convert {celsius} degrees C to F.",
          "How many Fahrenheit is {celsius} degrees Celsius?"),
         lambda a, r: f"{a['celsius']} C is {r} F."),
    Tool(minutes_to_hours, "Split minutes into hours and minutes.", (("minutes", _I),),
         lambda r: {"minutes": r.randint(61, 900)},
         ("How many hours is {minutes} minutes?", "Convert {minutes} minutes to hours.",
          "Express {minutes} minutes in hours."),
         lambda a, r: f"{a['minutes']} minutes is {r['hours']} h {r['minutes']} min."),
    Tool(compute_area, "Area of a rectangle or triangle.",
         (("shape", _S), ("width", _F), ("height", _F)),
         lambda r: {"shape": r.choice(SHAPES), "width": r.randint(1, 50), "height": r.randint(1, 50)},
         ("What is the area of a {shape} with width {width} and height {height}?",
          "Find the area of a {shape}, width {width}, height {height}.",
          "Compute the area of a {shape} of width {width} and height {height}."),
         lambda a, r: f"The {a['shape']} has an area of {r}."),
    Tool(set_alarm, "Set an alarm.", (("hour", _I), ("minute", _I)),
         # Minutes of two digits, so that the value appears as written.
         lambda r: {"hour": r.randint(1, 23), "minute": r.randint(10, 59)},
         ("Set an alarm for {hour}:{minute}.", "Wake me up at {hour}:{minute}.",
          "Please set my alarm to {hour}:{minute}."),
         lambda a, r: f"Your alarm is set for {r['alarm']}."),
    Tool(send_message, "Send a text message.", (("recipient", _S), ("text", _S)),
         lambda r: {"recipient": r.choice(NAMES), "text": r.choice(MESSAGES)},
         ('Send "{text}" to {recipient}.', 'Text {recipient}: "{text}".',
          'Message {recipient} saying "{text}".'),
         lambda a, r: f"Your message to {a['recipient']} was sent."),
    Tool(word_count, "Count the words in a text.", (("text", _S),),
         lambda r: {"text": " ".join(r.choice(WORDS) for _ in range(r.randint(2, 6)))},
         ('How many words are in "{text}"?', 'Count the words in "{text}".',
          'Give me the word count of "{text}".'),
         lambda a, r: f"The text has {r} words."),
    Tool(reverse_text, "Reverse a text.", (("text", _S),),
         lambda r: {"text": r.choice(WORDS + NAMES)},
         ('Reverse "{text}".', 'What is "{text}" spelled backwards?', 'Write "{text}" in reverse.'),
         lambda a, r: f'"{a["text"]}" reversed is "{r}".'),
    Tool(to_upper, "Convert a text to upper case.", (("text", _S),),
         lambda r: {"text": r.choice(WORDS + MESSAGES)},
         ('Make "{text}" upper case.', 'Write "{text}" in capital letters.',
          'Convert "{text}" to upper case.'),
         lambda a, r: f'In upper case: "{r}".'),
    Tool(count_letter, "Count a letter in a text.", (("text", _S), ("letter", _S)),
         _letter_in_word,
         ('How many times does "{letter}" appear in "{text}"?',
          'Count the letter "{letter}" in "{text}".', 'How many "{letter}" are in "{text}"?'),
         lambda a, r: f'"{a["letter"]}" appears {r} times in "{a["text"]}".'),
    Tool(get_population, "Population of a country, in millions.", (("country", _S),),
         lambda r: {"country": r.choice(sorted(COUNTRIES))},
         ("What is the population of {country}?", "How many people live in {country}?",
          "Look up the population of {country}."),
         lambda a, r: f"{a['country']} has about {r} million people."),
    Tool(get_capital, "Capital city of a country.", (("country", _S),),
         lambda r: {"country": r.choice(sorted(COUNTRIES))},
         ("What is the capital of {country}?", "Which city is the capital of {country}?",
          "Name the capital of {country}."),
         lambda a, r: f"The capital of {a['country']} is {r}."),
    Tool(days_between, "Days between two dates (YYYY-MM-DD).", (("start", _S), ("end", _S)),
         _days,
         ("How many days are there from {start} to {end}?",
          "Count the days between {start} and {end}.",
          "What is the number of days from {start} until {end}?"),
         lambda a, r: f"There are {r} days from {a['start']} to {a['end']}."),
    Tool(translate, "Translate a word into a language.", (("word", _S), ("language", _S)),
         lambda r: {"word": r.choice(sorted(DICTIONARY)), "language": r.choice(LANGUAGES)},
         ('Translate "{word}" into {language}.', 'What is "{word}" in {language}?',
          'How do you say "{word}" in {language}?'),
         lambda a, r: f'"{a["word"]}" in {a["language"]} is "{r}".'),
    Tool(book_flight, "Book a flight on a date (YYYY-MM-DD).",
         (("origin", _S), ("destination", _S), ("date", _S)),
         lambda r: {**_two_cities(r), "date": _date(r, 2025).isoformat()},
         ("Book a flight from {origin} to {destination} on {date}.",
          "I need a flight from {origin} to {destination} on {date}.",
          "Get me a ticket from {origin} to {destination} for {date}."),
         lambda a, r: f"Booked flight {r['flight']} from {a['origin']} to {a['destination']}"
                      f" on {a['date']} for {r['price']} dollars."),
)}
TOOL_NAMES = tuple(sorted(TOOLS))


def execute_calls(calls: Sequence[dict]) -> list[str]:
  """Runs calls on the tool back ends; each result as a tool turn shows it.

  Args:
    calls: [{"name": ..., "arguments": {...}}, ...].

  Returns:
    One string per call: a string result as it is, others as compact JSON;
    an unknown tool or a failing call gives {"error": message}.
  """
  results = []
  for call in calls:
    try:
      if call["name"] not in TOOLS:
        raise ValueError(f"unknown tool {call['name']!r}")
      result = TOOLS[call["name"]].fn(**call["arguments"])
    except Exception as e:  # A tool error is a result the agent should see.
      result = {"error": f"{type(e).__name__}: {e}"}
    results.append(_result_text(result))
  return results


# -------------------------------------------------------------- records ---


@dataclasses.dataclass(frozen=True)
class _Request:
  tool: Tool
  template: int
  arguments: dict

  @property
  def question(self) -> str:
    return self.tool.questions[self.template].format(**self.arguments)

  def is_eval(self) -> bool:
    key = json.dumps([self.tool.name, self.template, self.arguments], sort_keys=True)
    return _stable_int("tool_use", key) % EVAL_BUCKETS == 0


def _split_seed(seed: int, split: str, level: int) -> int:
  return _stable_int("tool_use", seed, split, level)


def _draw_request(rng: random.Random, tool: Tool, split: str) -> _Request:
  for _ in range(_MAX_DRAWS_PER_ITEM):
    request = _Request(tool, rng.randrange(len(tool.questions)), tool.draw(rng))
    if request.is_eval() == (split == "eval"):
      return request
  raise ValueError(f"Tool {tool.name!r} has no {split} requests.")  # A bug in the tables.


def _draw_task(rng: random.Random, level: int, split: str) -> tuple[list[_Request], list[Tool]]:
  """The requests of one record and the tools its schema lists."""
  first = TOOLS[rng.choice(TOOL_NAMES)]
  requests = [_draw_request(rng, first, split)]
  if level == 2:
    # One in four asks the same tool twice (BFCL's 'parallel'), with new values.
    second = first if rng.random() < 0.25 else TOOLS[rng.choice([n for n in TOOL_NAMES
                                                                 if n != first.name])]
    for _ in range(_MAX_DRAWS_PER_ITEM):
      request = _draw_request(rng, second, split)
      if request.question != requests[0].question and request.arguments != requests[0].arguments:
        requests.append(request)
        break
    else:
      raise ValueError(f"Tool {second.name!r} has too few distinct {split} requests.")
  called = list(dict.fromkeys(r.tool.name for r in requests))
  # Three tools, not more, at level 2 too: four put the calls past 384 tokens.
  num_tools = 1 if level == 0 else 3
  others = rng.sample([n for n in TOOL_NAMES if n not in called], num_tools - len(called))
  tools = [TOOLS[n] for n in called + others]
  rng.shuffle(tools)
  return requests, tools


def _record(requests: list[_Request], tools: list[Tool], level: int, record_id: str) -> dict:
  calls = [{"name": r.tool.name, "arguments": dict(r.arguments)} for r in requests]
  # Called directly, not through execute_calls: a reference call that fails is
  # a bug in a draw and must raise, not become an error result.
  results = [r.tool.fn(**r.arguments) for r in requests]
  schemas = [t.schema() for t in tools]
  answer = " ".join(r.tool.answer(r.arguments, result) for r, result in zip(requests, results))
  return {
      "id": record_id,
      "task": "tool_use",
      "category": CATEGORIES[level],
      "level": level,
      "tools": schemas,
      "accepted_calls": [{"name": c["name"], "arguments": {k: [v] for k, v in c["arguments"].items()}}
                         for c in calls],
      "ordered": False,
      "messages": [
          {"role": "system", "content": agent.SYSTEM_PREFIX + _compact(schemas)},
          {"role": "user", "content": " ".join(r.question for r in requests)},
          {"role": "assistant", "content": agent.format_tool_calls(calls)},
          *({"role": "tool", "content": _result_text(result)} for result in results),
          {"role": "assistant", "content": answer},
      ],
  }


def make_records(
    split: str = "train", size: int = 1000, seed: int = 0, *,
    levels: Sequence[int] = LEVELS,
    unique: bool | None = None,
) -> list[dict]:
  """Generates `size` tool-use traces, spread evenly over `levels`.

  Args:
    split: 'train' or 'eval'; a request belongs to exactly one of them.
    size: number of records.
    seed: base seed; each split and level draws from its own seed, so a
      smaller size gives a prefix of a larger one.
    levels: difficulty levels to mix (0, 1, 2; see the module docstring);
      record i has level levels[i % len(levels)].
    unique: no question twice in the split. Defaults to True for eval and
      False for train: tools are drawn uniformly and some have few questions
      (60 for get_time_zone, one in EVAL_BUCKETS of them eval), so a large
      train set repeats those, each time among other distractors.

  Returns:
    Records in generation order (see the module docstring).
  """
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
  bad = [level for level in levels if level not in LEVELS]
  if bad or not levels:
    raise ValueError(f"levels must be a non-empty subset of {LEVELS}, got {list(levels)}.")
  if isinstance(size, bool) or not isinstance(size, int) or size < 0:
    raise ValueError(f"size must be an int >= 0, got {size!r}.")
  unique = split == "eval" if unique is None else unique
  rngs = {level: random.Random(_split_seed(seed, split, level)) for level in levels}
  seen: set[str] = set()
  records = []
  for i in range(size):
    level = levels[i % len(levels)]
    for _ in range(_MAX_DRAWS_PER_ITEM):
      requests, tools = _draw_task(rngs[level], level, split)
      question = " ".join(r.question for r in requests)
      if not (unique and question in seen):
        break
    else:
      raise ValueError(
          f"Level {level} has too few distinct {split} questions left to make {size} records;"
          " ask for fewer (or unique=False)."
      )
    seen.add(question)
    records.append(_record(requests, tools, level, f"tool_use/{split}/L{level}/{i}"))
  return records


def check_disjoint(train: Sequence[dict], eval_: Sequence[dict]) -> None:
  """Raises ValueError if any eval question also appears in train."""
  question = lambda r: r["messages"][1]["content"]
  train_questions = {question(r) for r in train}
  leaked = [r["id"] for r in eval_ if question(r) in train_questions]
  if leaked:
    raise ValueError(f"{len(leaked)} eval questions appear in train, e.g. {leaked[:5]}.")
