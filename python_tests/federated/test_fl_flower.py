"""The Flower adapter, for real when flwr is installed: a ClientApp invoked with real flwr Context
and Message objects (no server), its Adam state kept in context.state across rounds."""

import time

import pytest
import torch

flwr_app = pytest.importorskip("flwr.app")

from molkernels.federated.flower import STATE_KEY, LocalAdamClient  # noqa: E402

D_IN, N = 4, 32


def _data(node_id):
    g = torch.Generator().manual_seed(100 + node_id)
    return torch.randn(N, D_IN, generator=g), torch.randn(N, 1, generator=g)


def _model_fn(context):
    torch.manual_seed(0)
    return torch.nn.Linear(D_IN, 1)


def _loss_fn(model, context, step):
    x, y = _data(context.node_id)
    return torch.nn.functional.mse_loss(model(x), y)


def _context(node_id):
    return flwr_app.Context(run_id=1, node_id=node_id, node_config={}, state=flwr_app.RecordDict(), run_config={})


def _message(weights, node_id, round_, config=None):
    content = {"arrays": flwr_app.ArrayRecord(weights)}
    if config:
        content["config"] = flwr_app.ConfigRecord(config)
    metadata = flwr_app.Metadata(run_id=1, message_id=f"m{round_}-{node_id}", src_node_id=0, dst_node_id=node_id,
                                 reply_to_message_id="", group_id=str(round_), created_at=time.time(), ttl=3600.0,
                                 message_type="train")
    return flwr_app.Message(content=flwr_app.RecordDict(content), metadata=metadata)


def _reference(server_rounds, node_id, lr, E):
    """torch.optim.Adam on one client, its state kept across rounds, the model reset to the server's."""
    model = _model_fn(None)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    x, y = _data(node_id)
    for weights in server_rounds:
        model.load_state_dict(weights)
        for _ in range(E):
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            optimizer.step()
    return model.state_dict(), optimizer


def test_client_app_runs_local_adam_with_state_in_the_context():
    E, lr = 3, 0.05
    client = LocalAdamClient(_model_fn, _loss_fn, local_steps=E, lr=lr, num_examples=N)
    app = client.client_app()
    contexts = {node: _context(node) for node in (1, 2)}
    server = {k: v.clone() for k, v in _model_fn(None).state_dict().items()}
    sent = {1: [], 2: []}
    for round_ in range(3):
        replies = {}
        for node, context in contexts.items():
            sent[node].append({k: v.clone() for k, v in server.items()})
            reply = app(_message(server, node, round_), context)
            assert not reply.has_error()
            replies[node] = reply
            metrics = reply.content["metrics"]
            assert metrics["num-examples"] == N and metrics["adam_step"] == E * (round_ + 1)
            assert STATE_KEY in context.state  # the optimiser state stays on the client
        # FedAvg on the replies (equal num-examples)
        states = [r.content["arrays"].to_torch_state_dict() for r in replies.values()]
        server = {k: sum(s[k] for s in states) / len(states) for k in server}
    # each client's last reply equals torch.optim.Adam run with its state kept across rounds
    for node in (1, 2):
        expected, optimizer = _reference(sent[node], node, lr, E)
        got = replies[node].content["arrays"].to_torch_state_dict()
        for k in expected:
            assert torch.allclose(got[k], expected[k], rtol=1e-5, atol=1e-6)
        saved = contexts[node].state[STATE_KEY].to_torch_state_dict()
        m = torch.cat([optimizer.state[p]["exp_avg"].reshape(-1) for p in optimizer.param_groups[0]["params"]])
        assert torch.allclose(saved["exp_avg"][0], m, rtol=1e-5, atol=1e-7)
        assert int(saved["step"][0]) == 3 * E


def test_a_new_client_starts_fresh_and_config_overrides():
    client = LocalAdamClient(_model_fn, _loss_fn, local_steps=2, lr=0.01)
    app = client.client_app()
    server = _model_fn(None).state_dict()
    context = _context(3)
    app(_message(server, 3, 0), context)
    reply = app(_message(server, 3, 1, config={"local-steps": 4, "lr": 0.1}), context)
    assert reply.content["metrics"]["adam_step"] == 6
    fresh = app(_message(server, 3, 2), _context(3))  # another device: no state yet
    assert fresh.content["metrics"]["adam_step"] == 2
