"""Rule-based rewards for tests: `module:function` scorers."""


def word_count(prompt: str, response: str) -> float:
    return float(len(response.split()))


def shortness(prompt: str, response: str) -> float:
    return -float(len(response.split()))
