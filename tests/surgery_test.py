"""Tests for lowrank.surgery: matching, walking and replacing submodules."""

from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx

from lowrank import surgery


class _Wrap(nnx.Module):
  """A wrapper that holds another module as `base`."""

  def __init__(self, base):
    self.base = base


class _Block(nnx.Module):

  def __init__(self, rngs):
    self.proj = nnx.Linear(4, 4, rngs=rngs)


class _Toy(nnx.Module):
  """Attributes, an nnx.List, an nnx.Dict, plain list/dict and linear kinds."""

  def __init__(self, rngs):
    self.embed = nnx.Embed(10, 4, rngs=rngs)
    self.blocks = nnx.List([_Block(rngs), _Block(rngs)])
    self.heads = nnx.Dict({
        "gen": nnx.LinearGeneral(4, (2, 2), rngs=rngs),
        "ein": nnx.Einsum("bd,dk->bk", (4, 3), rngs=rngs),
        "7": nnx.Linear(4, 2, rngs=rngs),
    })
    self.plain_list = nnx.data([nnx.Linear(4, 4, rngs=rngs)])
    self.plain_dict = nnx.data({"k": nnx.Linear(4, 4, rngs=rngs)})
    self.wrapped = _Wrap(nnx.Linear(4, 4, rngs=rngs))


def _toy():
  return _Toy(nnx.Rngs(0))


_ALL_PATHS = [
    "blocks", "embed", "heads", "wrapped",
    "blocks.0", "blocks.1", "heads.7", "heads.ein", "heads.gen",
    "plain_dict.k", "plain_list.0", "wrapped.base",
    "blocks.0.proj", "blocks.1.proj",
]


class PathTest(parameterized.TestCase):

  def test_path_str(self):
    self.assertEqual(surgery.path_str(("blocks", 0, "proj")), "blocks.0.proj")
    self.assertEqual(surgery.path_str(()), "")

  def test_parse_path(self):
    self.assertEqual(surgery.parse_path("blocks.0.proj"), ("blocks", 0, "proj"))
    self.assertEqual(surgery.parse_path(["a", 1]), ("a", 1))
    self.assertEqual(surgery.parse_path(""), ())

  def test_parse_path_rejects_other_types(self):
    with self.assertRaisesRegex(TypeError, "dotted string or a tuple"):
      surgery.parse_path(3)

  def test_listing_truncates(self):
    self.assertEqual(surgery.listing(["a", "b"]), "a, b")
    self.assertEqual(surgery.listing(["a", "b", "c"], limit=2),
                     "a, b ... (+1 more)")


class MatchTest(parameterized.TestCase):

  def test_regex_is_a_full_match(self):
    match = surgery.match(r"blocks\.\d")
    self.assertTrue(match("blocks.0", None))
    self.assertFalse(match("blocks.0.proj", None))

  def test_names_match_the_path_or_a_suffix(self):
    match = surgery.match(["proj", "heads.gen"])
    self.assertTrue(match("blocks.1.proj", None))
    self.assertTrue(match("heads.gen", None))
    self.assertFalse(match("myproj", None))
    self.assertFalse(match("gen", None))

  def test_all_linear(self):
    model = _toy()
    found = [surgery.path_str(p) for p, m in surgery.iter_modules(model)
             if surgery.match("all-linear")(surgery.path_str(p), m)]
    self.assertCountEqual(found, [
        "blocks.0.proj", "blocks.1.proj", "heads.7", "heads.ein",
        "heads.gen", "plain_dict.k", "plain_list.0", "wrapped.base"])

  def test_all_linear_with_wrappers(self):
    model = _toy()
    match = surgery.match("all-linear", wrappers=(_Wrap,))
    self.assertTrue(match("wrapped", model.wrapped))
    self.assertFalse(surgery.match("all-linear")("wrapped", model.wrapped))
    self.assertFalse(match("embed", model.embed))

  def test_callable_is_the_predicate(self):
    match = surgery.match(lambda p, m: isinstance(m, nnx.Embed))
    self.assertTrue(match("embed", _toy().embed))

  def test_invalid_regex(self):
    with self.assertRaisesRegex(ValueError, r"Invalid targets regex '\('"):
      surgery.match("(")

  def test_invalid_regex_names_the_argument(self):
    with self.assertRaisesRegex(ValueError, r"Invalid exclude regex '\['"):
      surgery.match("[", "exclude")

  @parameterized.named_parameters(
      ("empty_list", []),
      ("non_strings", [1, 2]),
      ("number", 3),
      ("none", None),
  )
  def test_other_targets(self, targets):
    with self.assertRaisesRegex(
        ValueError, "targets must be a regex string, 'all-linear', or a "
        "non-empty list of module names; got"):
      surgery.match(targets)


class IterModulesTest(absltest.TestCase):

  def test_paths_shallower_first(self):
    self.assertEqual(surgery.paths(_toy()), _ALL_PATHS)

  def test_include_root(self):
    model = _toy()
    first = next(surgery.iter_modules(model, include_root=True))
    self.assertEqual(first[0], ())
    self.assertIs(first[1], model)

  def test_graph_order_children_first(self):
    order = [surgery.path_str(p) for p, _ in
             surgery.iter_modules(_toy(), graph_order=True)]
    self.assertCountEqual(order, _ALL_PATHS)
    self.assertLess(order.index("blocks.0.proj"), order.index("blocks.0"))
    self.assertLess(order.index("blocks.0"), order.index("blocks"))

  def test_kind_filters(self):
    self.assertEqual(surgery.paths(_toy(), kind=_Block),
                     ["blocks.0", "blocks.1"])
    self.assertEqual(surgery.paths(_toy(), kind=(nnx.Einsum, nnx.Embed)),
                     ["embed", "heads.ein"])

  def test_opaque_is_yielded_but_not_entered(self):
    got = surgery.paths(_toy(), opaque=(_Wrap, _Block))
    self.assertIn("wrapped", got)
    self.assertIn("blocks.0", got)
    self.assertNotIn("wrapped.base", got)
    self.assertNotIn("blocks.0.proj", got)


class GetSetTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("attribute", "embed"),
      ("nnx_list_index", "blocks.1"),
      ("nested_attribute", ("blocks", 0, "proj")),
      ("nnx_dict_key", "heads.gen"),
      ("nnx_dict_digit_key", "heads.7"),
      ("plain_list_index", "plain_list.0"),
      ("plain_dict_key", "plain_dict.k"),
      ("wrapper_base", "wrapped.base"),
  )
  def test_replace_at_each_container_kind(self, path):
    model = _toy()
    new = nnx.Linear(4, 5, rngs=nnx.Rngs(1))
    surgery.set_submodule(model, path, new)
    self.assertIs(surgery.get_submodule(model, path), new)
    keys = surgery.parse_path(path)
    self.assertIn(surgery.path_str(keys), surgery.paths(model))
    found = dict((surgery.path_str(p), m)
                 for p, m in surgery.iter_modules(model))
    self.assertIs(found[surgery.path_str(keys)], new)

  def test_replacement_is_seen_by_nnx(self):
    model = _toy()
    surgery.set_submodule(model, "blocks.0.proj",
                          nnx.Linear(4, 7, rngs=nnx.Rngs(1)))
    state = nnx.state(model)
    self.assertEqual(state["blocks"][0]["proj"]["kernel"].shape, (4, 7))

  def test_get_root(self):
    model = _toy()
    self.assertIs(surgery.get_submodule(model, ""), model)

  def test_get_missing_attribute(self):
    with self.assertRaisesRegex(
        LookupError, r"No submodule at 'blocks.0.nope': _Block at "
        r"'blocks.0' has no child 'nope'"):
      surgery.get_submodule(_toy(), "blocks.0.nope")

  def test_get_index_out_of_range(self):
    with self.assertRaisesRegex(LookupError,
                                r"No submodule at 'blocks.5'.*has no child 5"):
      surgery.get_submodule(_toy(), "blocks.5")

  def test_set_under_a_missing_parent(self):
    with self.assertRaisesRegex(LookupError, "No submodule at 'nope.x'"):
      surgery.set_submodule(_toy(), "nope.x", nnx.Linear(1, 1,
                                                         rngs=nnx.Rngs(0)))

  def test_set_root(self):
    with self.assertRaisesRegex(ValueError, "needs a non-empty path"):
      surgery.set_submodule(_toy(), (), _toy())


if __name__ == "__main__":
  absltest.main()
