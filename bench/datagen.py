"""Synthetic MovieLens-25M-shaped data sets, written in the ml-25m CSV layout.

`ratings.csv` (userId,movieId,rating,timestamp), `movies.csv` (movieId,title,genres),
`tags.csv` (userId,movieId,tag,timestamp) and `links.csv` (movieId,imdbId,tmdbId),
shaped like ml-25m: 162,541 users, 59,047 movies and 25,000,095 ratings at full size,
Zipf-like movie popularity, long-tailed user activity with at least 20 ratings per user,
no repeated (user, movie) pair, the ml-25m half-star histogram, and timestamps in
1995-2019 that increase within each user. Smaller sizes scale users and movies with
the ratings. Tags: 1,093,360 applications at full size (scaled with the ratings) by a
few heavy taggers, on popular movies, from a Zipf-like vocabulary with commas and
quotes that need CSV quoting, in 2005-2019; links: one row per movie with a 7-digit
zero-padded imdbId and a tmdbId, a few missing as in GroupLens's file. Generation is
numpy, chunked by users, so memory stays bounded; files
are cached under a work directory keyed by size, seed and generator version.

    python bench/datagen.py --ratings 2000000 --workdir data/bench
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist

import numpy as np

GENERATOR_VERSION = 2  # bump when the output changes, so cached files are not reused
REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_WORKDIR = REPO_ROOT / "data" / "bench"

ML25M_RATINGS = 25_000_095
ML25M_USERS = 162_541
ML25M_MOVIES = 59_047
ML25M_TAGS = 1_093_360
ML25M_TAGGERS = 14_592  # users with at least one tag
ML25M_TAG_WORDS = 73_050  # distinct tag texts
FIRST_TAG_TIMESTAMP = 1_135_429_210  # 2005-12-24, the first ml-25m tag
MISSING_TMDB_SHARE = 107 / 62_423  # links.csv rows of ml-25m without a tmdbId
ML25M_MAX_MOVIE_ID = 209_171  # ml-25m ids are sparse: 59,047 rated movies up to id 209,171
MIN_USER_RATINGS = 20  # ml-25m keeps only users with at least 20 ratings
MIN_MOVIES = 1_000  # small runs still get a catalogue with a head and a tail
MAX_USER_SHARE = 0.55  # the most active ml-25m user rated ~55% of the rated movies
FIRST_TIMESTAMP = 789_652_009  # 1995-01-09, the first ml-25m rating
LAST_TIMESTAMP = 1_574_327_703  # 2019-11-21, the last one
DAY = 86_400

# ml-25m's rating histogram for 0.5, 1.0, ..., 5.0 stars.
STAR_COUNTS = np.array([393_068, 776_815, 399_490, 1_640_868, 1_262_797, 4_896_928,
                        3_177_318, 6_639_798, 2_200_156, 3_612_474], dtype=np.float64)
# Popularity of the movie of rank r is proportional to (r + offset)^-exponent. With
# these values the full-size top movie gets ~90k ratings (ml-25m: 81,491 for Forrest
# Gump), the median movie ~10, and the top 10% of movies ~95% of all ratings.
POPULARITY_EXPONENT = 1.9
POPULARITY_OFFSET = 250 / ML25M_MOVIES  # as a fraction of the catalogue, to scale down
USER_ACTIVITY_SIGMA = 1.39  # lognormal: ml-25m median ~71 ratings per user, mean ~154
HEAVY_USER_SHARE = 1 / 50  # users rating more than this share of movies use exact top-k
CHUNK_ROWS = 1 << 20  # ratings generated and written per chunk (bounds memory)

GENRES = ["Action", "Adventure", "Animation", "Children", "Comedy", "Crime", "Documentary",
          "Drama", "Fantasy", "Film-Noir", "Horror", "IMAX", "Musical", "Mystery", "Romance",
          "Sci-Fi", "Thriller", "War", "Western"]
GENRE_COUNTS = np.array([7348, 4145, 2929, 2935, 16870, 5319, 5605, 25606, 2731, 353, 5989,
                         195, 1054, 2925, 7719, 3595, 8654, 1874, 1399], dtype=np.float64)
NO_GENRES = "(no genres listed)"
NO_GENRES_SHARE = 0.08  # 5,062 of ml-25m's 62,423 movies
GENRES_PER_MOVIE = np.array([0.45, 0.33, 0.16, 0.06])  # P(1), P(2), P(3), P(4 genres)

RATINGS_HEADER = b"userId,movieId,rating,timestamp\n"
MOVIES_HEADER = "movieId,title,genres\n"
TAGS_HEADER = "userId,movieId,tag,timestamp\n"
LINKS_HEADER = "movieId,imdbId,tmdbId\n"


@dataclass(frozen=True)
class Shape:
    """How big a generated data set is, and its seed."""

    ratings: int
    users: int
    movies: int
    max_movie_id: int
    seed: int

    @classmethod
    def scaled(cls, ratings: int = ML25M_RATINGS, seed: int = 42) -> Shape:
        """ml-25m's proportions at `ratings` ratings (users and movies scale linearly)."""
        if ratings < MIN_USER_RATINGS:
            raise ValueError(f"need at least {MIN_USER_RATINGS} ratings (one user's minimum)")
        fraction = ratings / ML25M_RATINGS
        users = min(max(1, round(ML25M_USERS * fraction)), ratings // MIN_USER_RATINGS)
        movies = max(MIN_MOVIES, round(ML25M_MOVIES * fraction))
        max_id = max(movies, round(movies * ML25M_MAX_MOVIE_ID / ML25M_MOVIES))
        shape = cls(ratings, users, movies, max_id, seed)
        if users * shape.user_cap < ratings:
            raise ValueError(f"{ratings} ratings do not fit {users} users x {movies} movies")
        return shape

    @property
    def user_cap(self) -> int:
        """Most ratings one user may have."""
        return max(MIN_USER_RATINGS, int(self.movies * MAX_USER_SHARE))

    @property
    def tags(self) -> int:
        """Tag applications: ml-25m's count scaled with the ratings."""
        return round(ML25M_TAGS * self.ratings / ML25M_RATINGS)

    @property
    def name(self) -> str:
        # "ml-25m" in the name makes `recsys ingest` detect the layout as ml-25m.
        return f"ml-25m-synth-v{GENERATOR_VERSION}-r{self.ratings}-s{self.seed}"


@dataclass(frozen=True)
class Dataset:
    """A generated data set on disk."""

    root: Path
    shape: Shape

    @property
    def ratings_csv(self) -> Path:
        return self.root / "ratings.csv"

    @property
    def movies_csv(self) -> Path:
        return self.root / "movies.csv"

    @property
    def tags_csv(self) -> Path:
        return self.root / "tags.csv"

    @property
    def links_csv(self) -> Path:
        return self.root / "links.csv"

    @property
    def files(self) -> list[Path]:
        return [self.ratings_csv, self.movies_csv, self.tags_csv, self.links_csv]


def _rng(seed: int, *stream: int) -> np.random.Generator:
    """An independent, reproducible stream per purpose (and per chunk)."""
    return np.random.default_rng([seed, *stream])


def movie_ids(shape: Shape) -> np.ndarray:
    """Sorted, sparse movie ids in 1..max_movie_id, like ml-25m's."""
    rng = _rng(shape.seed, 1)
    return np.sort(rng.choice(shape.max_movie_id, shape.movies, replace=False)) + 1


def popularity(shape: Shape) -> np.ndarray:
    """Probability that a draw picks each movie (index into `movie_ids`); Zipf-like."""
    rng = _rng(shape.seed, 2)
    offset = max(1.0, POPULARITY_OFFSET * shape.movies)
    by_rank = (np.arange(shape.movies) + offset) ** -POPULARITY_EXPONENT
    weights = np.empty(shape.movies)
    weights[rng.permutation(shape.movies)] = by_rank  # popularity independent of id
    return weights / weights.sum()


def user_counts(shape: Shape) -> np.ndarray:
    """Ratings per user: 20 + a lognormal share of the rest, capped, summing exactly."""
    rng = _rng(shape.seed, 3)
    weights = rng.lognormal(0.0, USER_ACTIVITY_SIGMA, shape.users)
    counts = np.full(shape.users, MIN_USER_RATINGS, dtype=np.int64)
    extra = shape.ratings - counts.sum()
    free = np.ones(shape.users, dtype=bool)
    while extra > 0:  # what the cap cuts off goes to the users still under it
        live = np.where(free, weights, 0.0)
        share = extra * live / live.sum()
        add = np.floor(share).astype(np.int64)
        # Largest remainders take the leftover units so the total is exact.
        leftover = int(extra - add.sum())
        add[np.argsort(add - share, kind="stable")[:leftover]] += 1
        counts += add
        over = np.maximum(counts - shape.user_cap, 0)
        counts -= over
        extra = int(over.sum())
        free &= counts < shape.user_cap
    return counts


def _chunks(counts: np.ndarray) -> Iterator[tuple[int, int]]:
    """(first user, end user) index ranges of about CHUNK_ROWS ratings each."""
    ends = np.cumsum(counts)
    start, done = 0, 0
    while start < len(counts):
        end = max(start + 1, int(np.searchsorted(ends, done + CHUNK_ROWS, side="right")))
        yield start, end
        done = int(ends[end - 1])
        start = end


def _sample_light(rng: np.random.Generator, cdf: np.ndarray, counts: np.ndarray
                  ) -> np.ndarray:
    """Movies for users rating a small share of the catalogue, no repeats per user.

    Draws with replacement from the popularity, then redraws repeats, rechecking only
    the users that had one (their number shrinks fast), until none are left.
    """
    owner = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
    items = np.searchsorted(cdf, rng.random(len(owner)), side="right")
    rows = np.arange(len(owner))
    size = len(cdf)
    while len(rows):
        keys = owner[rows] * size + items[rows]
        order = np.argsort(keys, kind="stable")  # stable: the first occurrence is kept
        repeated = np.zeros(len(rows), dtype=bool)
        repeated[order[1:][keys[order[1:]] == keys[order[:-1]]]] = True
        if not repeated.any():
            break
        redo = rows[repeated]
        items[redo] = np.searchsorted(cdf, rng.random(len(redo)), side="right")
        rows = rows[np.isin(owner[rows], np.unique(owner[redo]))]
    return np.minimum(items, size - 1)  # guards the cdf's last float rounding


def _sample_heavy(rng: np.random.Generator, log_weights: np.ndarray, count: int) -> np.ndarray:
    """`count` distinct movies for one heavy user: Gumbel top-k, in random order."""
    keys = log_weights + rng.gumbel(size=len(log_weights))
    chosen = np.argpartition(-keys, count - 1)[:count]
    return rng.permutation(chosen)


def _ascii_digits(values: np.ndarray, width: int) -> np.ndarray:
    """(n, width) ASCII digits of non-negative ints, right-aligned, 0 bytes as padding."""
    out = np.zeros((len(values), width), dtype=np.uint8)
    rest = values.astype(np.int64, copy=True)
    for position in range(width - 1, -1, -1):
        digit = (rest % 10).astype(np.uint8) + ord("0")
        out[:, position] = digit if position == width - 1 else np.where(rest > 0, digit, 0)
        rest //= 10
    return out


def format_ratings(users: np.ndarray, movies: np.ndarray, halves: np.ndarray,
                   stamps: np.ndarray) -> bytes:
    """CSV lines `user,movie,r.r,timestamp`, built as a byte matrix (no per-row Python)."""
    n = len(users)

    def const(char: str) -> np.ndarray:
        return np.full((n, 1), ord(char), dtype=np.uint8)

    whole = (halves // 2).astype(np.uint8) + ord("0")
    tenth = np.where(halves % 2 == 1, ord("5"), ord("0")).astype(np.uint8)
    matrix = np.hstack([
        _ascii_digits(users, len(str(int(users.max())))), const(","),
        _ascii_digits(movies, len(str(int(movies.max())))), const(","),
        whole[:, None], const("."), tenth[:, None], const(","),
        _ascii_digits(stamps, len(str(int(stamps.max())))), const("\n"),
    ])
    return matrix[matrix != 0].tobytes()  # row-major: drops padding, keeps line order


def _rating_thresholds() -> np.ndarray:
    """Standard-normal cut points that give the ml-25m histogram."""
    cumulative = np.cumsum(STAR_COUNTS)[:-1] / STAR_COUNTS.sum()
    normal = NormalDist()
    return np.array([normal.inv_cdf(float(p)) for p in cumulative])


def write_ratings(shape: Shape, path: Path) -> None:
    """Generate ratings.csv chunk by chunk: users in id order, each user's rows in time order."""
    rng = _rng(shape.seed, 4)
    ids = movie_ids(shape)
    weights = popularity(shape)
    cdf = np.cumsum(weights)
    log_weights = np.log(weights)
    counts = user_counts(shape)
    # Ratings = user bias + movie bias + noise, cut at normal quantiles so the overall
    # histogram is ml-25m's while users and movies still differ (useful for training).
    user_bias = rng.normal(0.0, 0.45, shape.users)
    movie_bias = rng.normal(0.0, 0.45, shape.movies)
    spread = math.sqrt(0.45**2 + 0.45**2 + 0.8**2)
    thresholds = _rating_thresholds()
    # Each user rates inside a window: start uniform over 1995-2019, length lognormal
    # (median a day for a 20-rating user, longer for busier users), clipped to 2019.
    room = LAST_TIMESTAMP - FIRST_TIMESTAMP - counts
    starts = FIRST_TIMESTAMP + (rng.random(shape.users) * room).astype(np.int64)
    lengths = rng.lognormal(math.log(DAY), 2.5, shape.users) * np.sqrt(counts / 20)
    lengths = np.minimum(lengths, LAST_TIMESTAMP - starts - counts).astype(np.int64)
    heavy_above = max(MIN_USER_RATINGS, int(shape.movies * HEAVY_USER_SHARE))
    with path.open("wb") as out:
        out.write(RATINGS_HEADER)
        for index, (first, end) in enumerate(_chunks(counts)):
            chunk_rng = _rng(shape.seed, 5, index)
            sizes = counts[first:end]
            owner = np.repeat(np.arange(end - first), sizes)
            bounds = np.concatenate([[0], np.cumsum(sizes)])
            items = np.empty(len(owner), dtype=np.int64)
            heavy = sizes > heavy_above
            light_rows = ~heavy[owner]
            items[light_rows] = _sample_light(chunk_rng, cdf, sizes[~heavy])
            for local in np.flatnonzero(heavy):
                items[bounds[local]:bounds[local + 1]] = _sample_heavy(
                    chunk_rng, log_weights, int(sizes[local]))
            # Sorted uniforms per user from normalised cumulative exponential gaps (no sort).
            gaps = chunk_rng.standard_exponential(len(owner) + len(sizes))
            sums = np.cumsum(gaps)
            ends_at = bounds[1:] + np.arange(1, len(sizes) + 1) - 1  # each user's extra gap
            begins = np.concatenate([[0.0], sums[ends_at[:-1]]])
            row_gap = np.arange(len(owner)) + owner  # skip the extra gap of earlier users
            fraction = (sums[row_gap] - begins[owner]) / (sums[ends_at] - begins)[owner]
            position = np.arange(len(owner)) - bounds[owner]
            user = first + owner
            stamps = (starts[user] + (fraction * lengths[user]).astype(np.int64) + position)
            score = (user_bias[user] + movie_bias[items]
                     + chunk_rng.normal(0.0, 0.8, len(owner))) / spread
            halves = np.searchsorted(thresholds, score) + 1
            out.write(format_ratings(user + 1, ids[items], halves, stamps))


def write_movies(shape: Shape, path: Path) -> None:
    """movies.csv: every movie id, quoted 'Movie <id> (<year>)' titles, '|'-joined genres."""
    rng = _rng(shape.seed, 6)
    ids = movie_ids(shape)
    years = 2019 - np.minimum(rng.exponential(22.0, shape.movies).astype(np.int64), 117)
    # Weighted choice of k distinct genres per movie via Gumbel top-k over all genres.
    keys = np.log(GENRE_COUNTS) + rng.gumbel(size=(shape.movies, len(GENRES)))
    ranked = np.argsort(-keys, axis=1)
    how_many = rng.choice(len(GENRES_PER_MOVIE), shape.movies, p=GENRES_PER_MOVIE) + 1
    none = rng.random(shape.movies) < NO_GENRES_SHARE
    lines = [MOVIES_HEADER]
    for row, (movie, year) in enumerate(zip(ids.tolist(), years.tolist(), strict=True)):
        genres = NO_GENRES if none[row] else "|".join(
            GENRES[g] for g in sorted(ranked[row, :how_many[row]].tolist()))
        lines.append(f'{movie},"Movie {movie} ({year})",{genres}\n')
    path.write_text("".join(lines), encoding="utf-8")


def tag_words(shape: Shape) -> list[str]:
    """The vocabulary: plain words, and some that need CSV quoting (commas, quotes)."""
    count = max(100, round(ML25M_TAG_WORDS * shape.ratings / ML25M_RATINGS))
    words = []
    for index in range(count):
        if index % 17 == 3:
            words.append(f"dark, weird {index}")
        elif index % 53 == 5:
            words.append(f'"based on a book" {index}')
        else:
            words.append(f"tag {index}")
    return words


def write_tags(shape: Shape, path: Path) -> None:
    """tags.csv sorted by user then movie: heavy taggers, popular movies, Zipf-like words."""
    rng = _rng(shape.seed, 7)
    ids = movie_ids(shape)
    words = tag_words(shape)
    taggers = max(1, min(shape.users, round(ML25M_TAGGERS * shape.ratings / ML25M_RATINGS)))
    tagger_ids = np.sort(rng.choice(shape.users, taggers, replace=False)) + 1
    activity = rng.pareto(0.8, taggers) + 1.0  # a few users apply most of the tags
    users = tagger_ids[np.searchsorted(np.cumsum(activity / activity.sum()),
                                       rng.random(shape.tags), side="right").clip(0, taggers - 1)]
    movies = ids[np.searchsorted(np.cumsum(popularity(shape)), rng.random(shape.tags),
                                 side="right").clip(0, shape.movies - 1)]
    by_rank = (np.arange(len(words)) + 10.0) ** -1.1
    word = np.searchsorted(np.cumsum(by_rank / by_rank.sum()), rng.random(shape.tags),
                           side="right").clip(0, len(words) - 1)
    stamps = rng.integers(FIRST_TAG_TIMESTAMP, LAST_TIMESTAMP, shape.tags)
    order = np.lexsort((stamps, movies, users))
    quoted = [('"' + w.replace('"', '""') + '"') if ("," in w or '"' in w) else w for w in words]
    with path.open("w", encoding="utf-8", newline="") as out:
        out.write(TAGS_HEADER)
        for start in range(0, shape.tags, CHUNK_ROWS):
            part = order[start:start + CHUNK_ROWS]
            out.write("".join(
                f"{u},{m},{quoted[w]},{t}\n" for u, m, w, t in zip(
                    users[part].tolist(), movies[part].tolist(), word[part].tolist(),
                    stamps[part].tolist(), strict=True)))


def write_links(shape: Shape, path: Path) -> None:
    """links.csv: one row per movie, imdbId zero-padded to 7 digits, a few tmdbIds missing."""
    rng = _rng(shape.seed, 8)
    ids = movie_ids(shape)
    imdb = np.sort(rng.choice(9_999_999, shape.movies, replace=False)) + 1
    tmdb = rng.choice(999_999, shape.movies, replace=False) + 1
    missing = rng.random(shape.movies) < MISSING_TMDB_SHARE
    lines = [LINKS_HEADER]
    for movie, i, t, gone in zip(ids.tolist(), imdb.tolist(), tmdb.tolist(), missing.tolist(),
                                 strict=True):
        lines.append(f"{movie},{i:07d},{'' if gone else t}\n")
    path.write_text("".join(lines), encoding="utf-8")


def generate(shape: Shape, root: Path) -> Dataset:
    """Write the data set into `root` (created; existing files are overwritten)."""
    root.mkdir(parents=True, exist_ok=True)
    write_movies(shape, root / "movies.csv")
    write_ratings(shape, root / "ratings.csv")
    write_tags(shape, root / "tags.csv")
    write_links(shape, root / "links.csv")
    return Dataset(root, shape)


def ensure_dataset(ratings: int = ML25M_RATINGS, seed: int = 42,
                   workdir: Path = DEFAULT_WORKDIR) -> tuple[Dataset, bool]:
    """The cached data set of that size and seed, generated if missing. (dataset, reused)"""
    shape = Shape.scaled(ratings, seed)
    root = workdir / shape.name
    if all(path.is_file() for path in Dataset(root, shape).files):
        return Dataset(root, shape), True
    # Generate beside the target and rename, so an interrupted run is never reused.
    partial = workdir / f".{shape.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        generate(shape, partial)
        try:
            partial.rename(root)
        except OSError:
            if not (root / "ratings.csv").is_file():  # not a concurrent twin's finished copy
                raise
            return Dataset(root, shape), True
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return Dataset(root, shape), False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratings", type=int, default=ML25M_RATINGS)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    args = parser.parse_args(argv)
    clock = time.perf_counter()
    dataset, reused = ensure_dataset(args.ratings, args.seed, args.workdir)
    shape = dataset.shape
    print(f"{'reused' if reused else 'generated'} {dataset.root}: {shape.ratings:,} ratings, "
          f"{shape.users:,} users, {shape.movies:,} movies, {shape.tags:,} tags in "
          f"{time.perf_counter() - clock:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
