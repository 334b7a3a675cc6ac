"""Stop strings in streamed text, at a cost proportional to the new text only.

Each stop string has a Knuth-Morris-Pratt automaton whose state is the length of the longest
prefix of the string that the text seen so far ends with. A piece of text advances every state
one character at a time (amortized O(1) each), so a long stop string costs nothing per token
beyond its characters' worth, and the text to hold back (it may begin a stop string) is simply
the largest state. Generation stops where the first stop string completes (earliest end; of
those ending at the same character, the longest).
"""

from __future__ import annotations


def _failure(s: str) -> list[int]:
    """fail[i]: the length of the longest proper prefix of s[:i + 1] that is also its suffix."""
    fail, k = [0] * len(s), 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = fail[k - 1]
        if s[i] == s[k]:
            k += 1
        fail[i] = k
    return fail


class StopMatcher:
    def __init__(self, stops: list[str]):
        self.stops = stops
        self.failures = [_failure(s) for s in stops]
        self.states = [0] * len(stops)

    def feed(self, piece: str) -> int | None:
        """Advance over `piece`; returns where in `piece` the first completed stop string starts
        (negative: it starts in earlier text), or None when none completes."""
        for i, ch in enumerate(piece):
            longest = 0  # of the stop strings ending here, the longest starts first
            for j, (s, fail) in enumerate(zip(self.stops, self.failures)):
                k = self.states[j]
                while k and ch != s[k]:
                    k = fail[k - 1]
                if ch == s[k]:
                    k += 1
                if k == len(s):
                    longest = max(longest, k)
                    k = fail[k - 1]
                self.states[j] = k
            if longest:
                return i + 1 - longest
        return None

    @property
    def partial(self) -> int:
        """How many of the latest characters may begin a stop string (hold them back)."""
        return max(self.states, default=0)
