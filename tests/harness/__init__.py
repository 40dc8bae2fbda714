"""What the tests start and build, kept apart from the tests themselves: no test module imports another.

- `servers`: fake-gcs-server and OTLP trace receivers (gRPC and HTTP) on loopback;
- `faulty_gcs`: a GCS stand-in that misbehaves on purpose, object by object;
- `image_host`: a web server that serves images by URL (statuses, redirects, oversized bodies)
  and records every request, for the URL-input tests;
- `prometheus`: a real Prometheus run from a copy of the project's observability/ folder;
- `stage_load`: the closed-loop load at rising concurrency that the Prometheus tests send;
- `dashboards`: the Grafana dashboards' queries, evaluated against such a load, and the checks
  that Prometheus agrees with what the load client saw;
- `replicas`: `cliplens serve` processes behind a real HAProxy;
- `service`: one `cliplens serve` process, for tests that attack or stop it from outside;
- `manifests`: the Kubernetes manifests, rendered by kustomize;
- `hostile_bytes`: files that lie about themselves;
- `open_clip_reference`: open_clip's own preprocessing, the reference cliplens is held to.

Process helpers the experiment uses too (`stop_process`, `wait_until_answering`, `free_port`) stay
in `cliplens.experiment`; tests import them from there.
"""
