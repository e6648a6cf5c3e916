"""build_stage: a PipelineStage from a model traced and split by torch.distributed.pipelining."""

from __future__ import annotations

import inspect
import operator
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from .stage import PipelineStage

_FORMS = (
    "build_stage(pipe, stage_index, device=None, group=None) or torch's "
    "build_stage(stage_module, stage_index, pipe_info, device=None, group=None)"
)


def build_stage(*args, **kwargs) -> PipelineStage:
    """A ``ppfast.PipelineStage`` running one stage of a model split by torch's ``pipeline()``.

    Two call forms, with ``pipe = torch.distributed.pipelining.pipeline(model, mb_args, ...)``:

    - ``build_stage(pipe, stage_index, device=None, group=None)``, like ``pipe.build_stage``;
    - ``build_stage(stage_module, stage_index, pipe_info, device=None, group=None)``, like
      torch's ``build_stage``, with ``pipe.get_stage_module(i)`` and ``pipe.info()``.

    Both also take ``dynamic_shapes`` and ``tied`` as ``PipelineStage`` does. The first stage
    takes the model's own arguments (``schedule.step(x, mask=m)``). Every stage gets what
    the stage before it returns, so a value a later stage needs (a model input such as a mask,
    or an activation from further back, e.g. a skip connection) is handed on by each stage in
    between; the stage's module is then a rewritten copy of ``pipe.get_stage_module(i)`` that
    shares its parameters. The last stage returns what its traced module returns, which is
    what ``loss_fn(output, target)`` gets, as under torch's schedules. A parameter the model
    uses in several stages (a tied embedding and head), which ``pipeline()`` copies into each,
    is declared tied on every stage that holds a copy (Pipe form only: torch's pipe_info does
    not say which parameters were copied), so the copies train as one weight.
    """
    first = args[0] if args else kwargs.get("pipe", kwargs.get("stage_module"))
    form = _from_pipe if _is_pipe(first) else _from_stage_module
    try:
        inspect.signature(form).bind(*args, **kwargs)
    except TypeError as e:
        raise TypeError(f"{e}; call it as {_FORMS}") from None
    return form(*args, **kwargs)


def _from_pipe(
    pipe,
    stage_index: int,
    device=None,
    group=None,
    *,
    dynamic_shapes: bool = False,
    tied: dict[str, nn.Parameter] | None = None,
) -> PipelineStage:
    if _is_pipe_info(device):
        raise TypeError(
            "build_stage(pipe, stage_index, device, group) takes the device after the stage "
            "index; pass pipe_info only with a stage module: build_stage(pipe.get_stage_module"
            "(i), i, pipe.info(), device, group)"
        )
    info = pipe.info()
    plan = _Plan(info.graph, info.num_stages)
    plan.check_index(stage_index)
    ties = _replicated(pipe, plan, stage_index)
    return _build(
        pipe.get_stage_module(stage_index), stage_index, plan, device, group, dynamic_shapes,
        tied, ties,
    )  # fmt: skip


def _from_stage_module(
    stage_module,
    stage_index: int,
    pipe_info,
    device=None,
    group=None,
    *,
    dynamic_shapes: bool = False,
    tied: dict[str, nn.Parameter] | None = None,
) -> PipelineStage:
    if not isinstance(stage_module, fx.GraphModule):
        raise TypeError(
            f"stage_module must be the traced stage module, pipe.get_stage_module({stage_index}) "
            f"(a torch.fx.GraphModule), got {type(stage_module).__name__}; for a module split by "
            f"hand use ppfast.PipelineStage. Call forms: {_FORMS}"
        )
    if not _is_pipe_info(pipe_info):
        raise TypeError(
            f"pipe_info must be pipe.info() of the traced Pipe, got {type(pipe_info).__name__}"
        )
    plan = _Plan(pipe_info.graph, pipe_info.num_stages)
    plan.check_index(stage_index)
    return _build(stage_module, stage_index, plan, device, group, dynamic_shapes, tied, {})


def _is_pipe(obj) -> bool:
    try:
        from torch.distributed.pipelining import Pipe
    except ImportError:  # a torch build without torch.distributed
        return False
    return isinstance(obj, Pipe)


def _is_pipe_info(obj) -> bool:
    # duck-typed: PipeInfo lives in a private module whose fields differ between torch versions
    return isinstance(getattr(obj, "graph", None), fx.Graph) and hasattr(obj, "num_stages")


# ---------------------------------------------------------------------------- the split graph


@dataclass(frozen=True)
class _Value:
    """A value of the pipe's top-level graph: a model input or (part of) a stage's output."""

    stage: int  # the stage that computes it; -1 for a model input
    index: int | None  # model input position, or output position (None: the whole output)
    name: str = field(compare=False)  # its node's name in the top-level graph


class _Plan:
    """What each stage takes and what each stage hands to the next.

    torch's traced stages may take model inputs (not only the first stage) and outputs of any
    earlier stage; ppfast's stage i takes exactly what stage i - 1 returns. So stage i's
    inputs are the values ``crossing[i - 1]``: those computed before stage i (or given to the
    model) that stage i or a later stage uses. A stage passes on the ones it does not compute.
    """

    def __init__(self, graph: fx.Graph, num_stages: int):
        self.nodes = [n for n in graph.nodes if n.op == "call_module"]
        # pipeline() numbers its stage modules (meta "stage_idx", from their names, which is
        # what pipe.get_stage_module goes by); the graph may list a stage that takes nothing
        # from the others before a lower-numbered one
        if all(isinstance(n.meta.get("stage_idx"), int) for n in self.nodes):
            self.nodes.sort(key=lambda n: n.meta["stage_idx"])
        if len(self.nodes) != num_stages:
            raise ValueError(
                f"the pipe's graph has {len(self.nodes)} stage modules but pipe_info says "
                f"{num_stages} stages; pass pipe.info() of the Pipe the stage module came from"
            )
        self.num_stages = num_stages
        self.roots = [n for n in graph.nodes if n.op == "placeholder"]
        self.inputs = [_Value(-1, k, n.name) for k, n in enumerate(self.roots)]
        index = {n: i for i, n in enumerate(self.nodes)}
        self.stage_of_name = {n.target: i for i, n in enumerate(self.nodes)}
        self.uses: list[list[_Value]] = []
        for i, node in enumerate(self.nodes):
            if node.kwargs:
                raise ValueError(f"stage {i} is called with keyword arguments; {_UNKNOWN}")
            self.uses.append([self._value(a, i, index) for a in node.args])
            later = [v for v in self.uses[i] if v.stage >= i]
            if later:
                raise ValueError(
                    f"stage {i} uses {later[0].name!r}, which stage {later[0].stage} computes; "
                    "a stage can only use what the stages before it compute"
                )
        self.crossing = [self._crossing(b) for b in range(num_stages - 1)]

    def _value(self, arg, i: int, index: dict) -> _Value:
        if isinstance(arg, fx.Node):
            if arg.op == "placeholder":
                return self.inputs[self.roots.index(arg)]
            if arg.op == "call_module":
                return _Value(index[arg], None, arg.name)
            src, k = (arg.args + (None, None))[:2]
            if arg.target is operator.getitem and src in index and isinstance(k, int):
                return _Value(index[src], k, arg.name)
        raise ValueError(
            f"stage {i} takes {arg!r}, which is neither a model input nor a stage's output; "
            f"{_UNKNOWN}"
        )

    def _crossing(self, b: int) -> list[_Value]:
        # stage b + 1's inputs first, in its own order, so a split that is already a chain
        # keeps its modules as they are; then what later stages need from before b + 1
        out = list(dict.fromkeys(self.uses[b + 1]))
        for later in self.uses[b + 2 :]:
            out += [v for v in later if v.stage <= b and v not in out]
        if not out:
            before = "stage 0" if b == 0 else f"stages 0..{b}"
            raise ValueError(
                f"stage {b + 1} uses nothing the model's inputs or {before} compute, so "
                f"stage {b} has nothing to send it; place the split points so that each stage "
                "continues from the one before it"
            )
        for v in out:
            if v.stage < 0:
                _check_tensor(self.roots[v.index], f"model input {v.name!r}", b, v, self)
        return out

    def check_index(self, stage_index: int) -> None:
        if not isinstance(stage_index, int) or not 0 <= stage_index < self.num_stages:
            raise ValueError(
                f"stage_index {stage_index!r} is outside [0, {self.num_stages}); the pipe has "
                f"{self.num_stages} stages"
            )

    def takes(self, i: int) -> list[_Value]:
        return self.inputs if i == 0 else self.crossing[i - 1]

    def last_use(self, v: _Value) -> int:
        return max(i for i, used in enumerate(self.uses) if v in used)


_UNKNOWN = "ppfast runs the graphs torch.distributed.pipelining.pipeline() makes"


def _check_tensor(node: fx.Node, what: str, b: int, v: _Value, plan: _Plan) -> None:
    val = node.meta.get("val")
    if val is not None and not isinstance(val, torch.Tensor):
        raise ValueError(
            f"{what} ({type(val).__name__}) is used by stage {plan.last_use(v)} and so must go "
            f"from stage {b} to stage {b + 1}, but stages pass only tensors; make it a tensor, "
            "or move the split points so that one stage computes and uses it"
        )


# ---------------------------------------------------------------------------- the stage module


def _stage_module(gm: fx.GraphModule, i: int, plan: _Plan) -> fx.GraphModule:
    """``gm`` if its inputs and outputs are already what ppfast's stage i takes and returns,
    else a copy of it rewritten to take them, sharing its parameters and submodules."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    (out_node,) = [n for n in gm.graph.nodes if n.op == "output"]
    uses, takes = plan.uses[i], plan.takes(i)
    if len(placeholders) != len(uses):
        raise ValueError(
            f"the stage module takes {len(placeholders)} inputs but stage {i} of pipe_info "
            f"takes {len(uses)}; pass pipe.get_stage_module({i}) with that pipe's pipe.info()"
        )
    last = i == plan.num_stages - 1
    result = out_node.args[0]
    gives = [] if last else plan.crossing[i]
    produced = {v: _nth(result, v, i) for v in gives if v.stage == i}
    for v, node in produced.items():
        if isinstance(node, fx.Node):
            _check_tensor(node, f"stage {i}'s output {v.name!r}", i, v, plan)
    if isinstance(result, (tuple, list)):
        has = [_Value(i, k, "") for k in range(len(result))]
    else:
        has = [_Value(i, None, "")]
    if uses == takes and (last or has == gives):
        return gm

    g = fx.Graph()
    mine = dict(zip(uses, placeholders, strict=True))  # the value each input of gm stands for
    new: dict[_Value, fx.Node] = {}
    names: set[str] = set()
    for v in takes:
        # the first stage's inputs keep the model's argument names: step(x, mask=m) binds by name
        old = plan.roots[v.index] if i == 0 or v.stage < 0 else mine.get(v)
        name = old.target if old is not None else f"{v.name}_from_stage{v.stage}"
        while name in names:
            name += "_"
        names.add(name)
        default = old.args[0] if i == 0 and old.args else inspect.Signature.empty
        new[v] = g.placeholder(name, default_value=default)
        if old is not None:
            new[v].meta = dict(old.meta)
    env = {p: new[v] for v, p in mine.items()}
    for node in gm.graph.nodes:
        if node.op not in ("placeholder", "output"):
            env[node] = g.node_copy(node, lambda n: env[n])
    if last:
        g.output(fx.map_arg(result, lambda n: env[n]))
    else:
        vals = [
            fx.map_arg(produced[v], lambda n: env[n]) if v in produced else new[v] for v in gives
        ]
        g.output(tuple(vals) if len(vals) > 1 else vals[0])
    if i == 0:
        _keep_argument_structure(gm.graph, g, len(plan.roots))
    g.lint()
    return fx.GraphModule(gm, g, class_name=type(gm).__name__)


def _nth(result, v: _Value, i: int):
    if v.index is None:
        return result
    if not isinstance(result, (tuple, list)) or v.index >= len(result):
        raise ValueError(
            f"stage {i} is read at output {v.index}, which it does not return; {_UNKNOWN}"
        )
    return result[v.index]


def _keep_argument_structure(old: fx.Graph, g: fx.Graph, n_inputs: int) -> None:
    # pipeline() gives the first stage the model's argument structure (its pytree codegen:
    # nested or keyword inputs flattened into placeholders) when the stage takes every model
    # input. It flattens into placeholders in the model's order; the rewritten stage has
    # exactly those, in that order, so the codegen carries over (shared: nothing changes it).
    # torch's own first stage keeps them in order of first use, which mixes up inputs the
    # model uses out of order.
    codegen = getattr(old, "_codegen", None)
    spec = getattr(getattr(codegen, "pytree_info", None), "in_spec", None)
    if spec is not None and getattr(spec, "num_leaves", None) == n_inputs:
        g._codegen = codegen


# ---------------------------------------------------------------------------- building


def _replicated(pipe, plan: _Plan, stage_index: int) -> dict[str, str]:
    """{tie key: this stage's name for it} for every parameter pipeline() copied into several
    stages. ``Pipe.replicated_params`` lists, per such parameter, each stage module's name for
    it; a missing attribute (a torch that does not record it) means none are tied."""
    out = {}
    for users in getattr(pipe, "replicated_params", None) or ():
        where = {plan.stage_of_name[s]: q for s, q in users.items() if s in plan.stage_of_name}
        if stage_index in where and len(where) > 1:
            out[where[min(where)]] = where[stage_index]  # keyed by the lowest stage's name
    return out


def _build(gm, i, plan, device, group, dynamic_shapes, tied, ties) -> PipelineStage:
    module = _stage_module(gm, i, plan)
    declared = {}
    for key, name in ties.items():
        try:
            declared[key] = module.get_parameter(name)
        except AttributeError:
            continue  # a copy this stage's graph never reads: nothing to keep in step
    for key, p in (tied or {}).items():
        known = next((k for k, q in declared.items() if q is p), None)
        if known is not None and known != key:
            raise ValueError(
                f"tied[{key!r}] is a copy pipeline() made of a parameter several stages use, "
                f"which build_stage already ties as {known!r}; leave it out of tied"
            )
        if key in declared and declared[key] is not p:
            raise ValueError(
                f"tied[{key!r}]: build_stage already ties another parameter under that key (a "
                "copy pipeline() made of a parameter several stages use); use another key"
            )
        declared[key] = p
    if device is not None:
        device = torch.device(device)
        if not any(p.is_meta for p in module.parameters()):  # meta ones are materialized later
            module.to(device)
        _modify_op_device(module, device)
    return PipelineStage(
        module, i, plan.num_stages, device, group, dynamic_shapes=dynamic_shapes,
        tied=declared or None,
    )  # fmt: skip


def _modify_op_device(module: fx.GraphModule, device: torch.device) -> None:
    # tracing writes the tracing device into factory calls (torch.ones(..., device=...));
    # torch's Pipe.build_stage rewrites them with this private helper (a torch without it
    # leaves them as traced, as its own build_stage then would)
    try:
        from torch.distributed.pipelining._IR import _modify_graph_op_device
    except ImportError:
        return
    _modify_graph_op_device(module, device)
