"""Language identification per document, and the per-language stop-word lists.

`detect` runs py3langid (a fork of langid.py; its naive-Bayes model over byte n-grams ships
inside the wheel, so nothing is downloaded at run time) on a bounded prefix of the document,
with normalised probabilities so the confidence is comparable across documents.

Why a subclass: py3langid extracts features by walking its Aho-Corasick automaton one byte at a
time in a Python loop, ~0.2 ms per 2,000-character prefix, which alone would cost more than all
the quality rules together. The automaton's patterns are at most K bytes long (K = 6 for the
shipped model), so the state after any byte depends only on the last K bytes; we therefore walk
all positions at once, K vectorised numpy steps, and get exactly the library's feature counts
(checked at load on a probe text; any mismatch falls back to the library's own walk). The
scoring, normalisation and alias folding are py3langid's own code.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import numpy as np
from py3langid import langid as _pl

PREFIX_CHARS = 2_000  # what we classify: plenty for langid's n-gram model, bounds the cost
UNDETERMINED = "und"
_MAX_WINDOW = 8  # beyond this depth the vectorised walk would use too much memory per doc


class VectorIdentifier(_pl.LanguageIdentifier):
    """py3langid's identifier with the byte-at-a-time automaton walk vectorised."""

    __slots__ = ("_nm", "_rb", "_out", "_depth", "_ptc32")

    def _prepare(self) -> bool:
        """Build the numpy views; False when this model breaks the bounded-depth assumption."""
        nm = np.frombuffer(self.tk_nextmove, dtype=f"u{self.tk_nextmove.itemsize}")
        rb = np.asarray(self._rowbase, dtype=np.int64)
        depth = _automaton_depth(nm, rb)
        if depth is None or depth > _MAX_WINDOW:
            return False
        self._nm, self._rb, self._depth = nm, rb, depth
        self._out = np.asarray(self.tk_output, dtype=np.int64)
        # numpy has no fast float16 matmul: a float32 copy (57 MB) scores 5x faster, same values
        self._ptc32 = np.asarray(self.nb_ptc, dtype=np.float32)
        probe = ("Der schnelle braune Fuchs springt über den faulen Hund. "
                 "Быстрая коричневая лиса. 敏捷的棕色狐狸跳过了懒狗。 すばやい茶色の狐。 "
                 "The quick brown fox — 12,345 ... !!").encode()
        mine = self._visits(probe)
        theirs = _pl.visit_counts(self.tk_nextmove, self._rowbase, self.tk_output, probe)
        return mine is not None and dict(zip(*(a.tolist() for a in mine))) == dict(theirs)

    def _visits(self, data: bytes):
        """(feature ids, counts) the automaton emits over `data`, or None when it emits none."""
        b = np.frombuffer(data, dtype=np.uint8).astype(np.int64)
        n = b.size
        if n == 0:
            return None
        k = self._depth
        # state after byte i = the automaton run from the root over bytes i-k+1 .. i; positions
        # whose window starts before the text stay at the root until their window begins
        state = np.zeros(n, dtype=np.int64)
        for j in range(k):
            lag = k - 1 - j  # this step reads byte i - lag
            if lag >= n:
                continue
            state[lag:] = self._nm[self._rb[state[lag:]] + b[:n - lag]]
        feats = self._out[state]
        feats = feats[feats >= 0]
        if feats.size == 0:
            return None
        return np.unique(feats, return_counts=True)

    def _raw_score(self, text):
        visits = self._visits(text)
        if visits is None:
            return super()._raw_score(text)  # the library's featureless fill
        idx, counts = visits
        weights = np.log1p(counts.astype(np.float32))
        return weights @ np.take(self._ptc32, idx, axis=0) + self.nb_pc


def _automaton_depth(nm: np.ndarray, rowbase: np.ndarray) -> int | None:
    """Largest shortest-path distance from the root: the longest pattern of an Aho-Corasick
    automaton, hence how many trailing bytes determine its state. None if unreachable states."""
    n_states = rowbase.size
    seen = np.zeros(n_states, dtype=bool)
    seen[0] = True
    frontier, depth = np.array([0], dtype=np.int64), 0
    cols = np.arange(256, dtype=np.int64)
    while True:
        nxt = nm[(rowbase[frontier][:, None] + cols).ravel()]
        fresh = np.zeros(n_states, dtype=bool)
        fresh[nxt] = True
        fresh &= ~seen
        if not fresh.any():
            break
        seen |= fresh
        frontier = np.flatnonzero(fresh)
        depth += 1
    return depth if seen.all() else None


@functools.cache
def identifier() -> _pl.LanguageIdentifier:
    """Loaded once per process (about a second: the model is xz-compressed in the wheel)."""
    try:
        fast = VectorIdentifier.from_model_file(_pl.MODEL_FILE, norm_probs=True)
        if fast._prepare():
            return fast
    except (AttributeError, TypeError, ValueError, IndexError):  # other py3langid internals
        pass
    return _pl.LanguageIdentifier.from_model_file(_pl.MODEL_FILE, norm_probs=True)


def detect(text: str, max_chars: int = PREFIX_CHARS) -> tuple[str, float]:
    """(ISO 639-1 code where one exists, else py3langid's code; confidence in [0, 1]).

    Only the first `max_chars` characters are classified. Empty or whitespace-only text, and
    text without any letter-like feature, is ("und", 0.0).
    """
    head = text[:max_chars]
    if not head.strip():
        return UNDETERMINED, 0.0
    lang, conf = identifier().classify(head)
    if not math.isfinite(conf):
        return UNDETERMINED, 0.0
    return str(lang), min(1.0, max(0.0, float(conf)))


def detect_batch(texts: Sequence[str], max_chars: int = PREFIX_CHARS) -> list[tuple[str, float]]:
    return [detect(t, max_chars) for t in texts]


# ---------------------------------------------------------------------------------------------
# Stop words: common function words, enough that real prose of the language always contains a
# few (Gopher requires 2 of 8 English ones). Keys are py3langid codes. Languages written without
# spaces (SCRIPTIO_CONTINUA) are matched as substrings, the others as whitespace-separated words.

SCRIPTIO_CONTINUA = frozenset({"zh", "ja", "th", "lo", "km", "my", "yue", "wuu", "dz"})


def _words(s: str) -> frozenset[str]:
    return frozenset(s.split())


_ZH = _words("的 是 了 在 我 有 和 不 这 這 人 他 们 們 也 就 一个 一個 中 上 为 為 到 说 說 与 與 "
             "及 而 对 對 以 或 所 被 从 從 将 將 但 其")

STOP_WORDS: dict[str, frozenset[str]] = {
    "en": _words("the be to of and that have with a an in is it for on as was are this by not "
                 "or at from but he she they we you i his her their which will can has had were "
                 "been"),
    "de": _words("der die das und in zu den von ist nicht mit sich des auf für ein eine dem im "
                 "auch es an als wie bei oder aus nach wird sind war werden aber noch dass einen "
                 "einer nur so"),
    "fr": _words("le la les de des du un une et est en que qui dans pour pas sur au aux ce il "
                 "elle ne se plus par avec son sa ses sont été mais ou nous vous ils on cette"),
    "es": _words("el la los las de del y en que un una es por con para no se su sus al lo como "
                 "más pero o este esta ha son fue ser muy también sin sobre entre ya"),
    "it": _words("il lo la i gli le di del della e è un una che in per con non si da al alla dei "
                 "delle come più ma anche sono questo questa nel nella o"),
    "pt": _words("o a os as de do da dos das e em no na um uma que é para com não por se mais ao "
                 "como mas foi ser seu sua são ou pelo pela também este esta"),
    "nl": _words("de het een en van in is op te dat die niet met voor zijn er aan als ook maar "
                 "om door bij naar uit dan of wordt was werd hij ze we je deze dit"),
    "sv": _words("och i att det som en på är av för med till den har de inte om ett var jag men "
                 "sig så från"),
    "da": _words("og i at det som en på er af for med til den har de ikke om et var jeg men sig "
                 "så fra"),
    "no": _words("og i at det som en på er av for med til den har de ikke om et var jeg men seg "
                 "så fra"),
    "pl": _words("i w z na się nie do to że jest o jak a co ale od po za przez dla tak jego jej "
                 "są był była czy oraz lub może tylko"),
    "ro": _words("și şi în de la cu a al ale pe care că nu se o un este sunt din pentru mai ca "
                 "sau dar prin fost au ce lui cel cea iar"),
    "tr": _words("ve bir bu da de için ile çok daha olarak olan gibi ne o ama en kadar sonra her "
                 "veya ki mi var yok değil ise göre"),
    "id": _words("yang dan di ini itu dengan untuk dari dalam tidak akan pada ke adalah juga atau "
                 "ada oleh sebagai karena"),
    "vi": _words("của và các có là được trong cho một những với không người này đã để khi đến "
                 "từ theo cũng như về nhiều sẽ tại ra vào thì mà nhưng hay"),
    "ru": _words("и в не на что с по как это к из за для от но о так он она они все его её же "
                 "только бы был была было были или уже до при то мы вы я"),
    "uk": _words("і в у не на що з до та як це за для від але по про він вона вони був була "
                 "було або вже так ще"),
    "el": _words("και το η ο του της την τον των τα οι σε στο στην στη με για από να που είναι "
                 "δεν θα ένα μια ως στα στις στον τις τους αλλά ή"),
    "ar": _words("في من على إلى أن عن مع هذا هذه التي الذي كان ما لا و أو قد كل بين هو هي ثم إن "
                 "كما بعد عند ذلك لم لن"),
    "hi": _words("का की के है में और को से पर यह वह एक था थी थे हैं भी कि नहीं तो ने लिए या कर "
                 "हो इस उस जो गया साथ"),
    "ko": _words("이 그 저 것 수 등 및 더 또는 그리고 하지만 있다 없다 있는 하는 한다 했다 또한 "
                 "때문에 위해 통해 대한 같은 다른 모든 많은 때 중 후 전 안 잘 못 그러나 따라서 "
                 "이러한 그러한 이런 그런"),
    "ja": _words("の に は を た が で て と し れ さ ある いる する から など こと として です "
                 "ます"),
    "zh": _ZH,
    "yue": _ZH,
    "wuu": _ZH,
    "th": _words("ที่ และ ใน การ เป็น ของ มี ได้ ให้ ไม่ จะ ว่า กับ จาก นี้ แต่ หรือ โดย ซึ่ง "
                 "ความ คน อยู่"),
}
