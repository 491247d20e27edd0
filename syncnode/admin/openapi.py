"""The OpenAPI 3 description of the admin API (kept beside the code it describes).

Each operation's ``x-role`` is the least role that may call it (``public``: anybody who
reaches the port with a served Host; ``read``: the read-only or the admin key; ``admin``:
the admin key). The API's guard reads the roles from here; a route not described here is
refused.
"""

from __future__ import annotations

from typing import Any

from ..dicomweb.routes import OPENAPI_PATHS, STOW_PATHS
from ..service import PUSH_MODES

_ERR = {"description": "error", "content": {"application/json": {"schema": {
    "$ref": "#/components/schemas/Error"}}}}
_KEY = [{"apiKey": []}, {"session": []}]
_READ = {"x-role": "read", "security": _KEY}
_ADMIN = {"x-role": "admin", "security": _KEY}
_PUBLIC = {"x-role": "public", "security": []}
_DENIED = {"401": {"description": "no credential"}, "403": {"description": "wrong key, or "
                                                              "not allowed for its role"}}


def _json(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_OBJ = {"type": "object"}
_NODE_ID = {"name": "node_id", "in": "path", "required": True, "schema": {"type": "string"}}
_SCOPE = {"name": "scope", "in": "path", "required": True, "schema": {"type": "string"}}
_SOP = {"name": "sop_uid", "in": "path", "required": True,
        "schema": {"type": "string", "pattern": r"^[0-9.]{1,64}$"}}

OPENAPI: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {"title": "syncnode admin API", "version": "1",
             "description": "Every route that reads or changes patient data needs a key in "
                            "X-API-Key (read-only or admin role) or a dashboard session "
                            "cookie opened with one (POST /api/v1/session); changes need "
                            "the admin role. Requests with a Host the node does not serve "
                            "are refused (421)."},
    "components": {
        "securitySchemes": {"apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
                            "session": {"type": "apiKey", "in": "cookie",
                                        "name": "syncnode_session"}},
        "schemas": {
            "Error": {"type": "object", "required": ["error"],
                      "properties": {"error": {"type": "string"}}},
            "Instance": {"type": "object", "required": ["sop_instance_uid", "blob", "size"],
                         "properties": {k: {"type": "string"} for k in (
                             "event_id", "sop_instance_uid", "sop_class_uid",
                             "series_instance_uid", "study_instance_uid", "patient_id",
                             "modality", "study_date", "transfer_syntax_uid", "blob",
                             "chunks", "origin")} | {"size": {"type": "integer"},
                                                     "hlc": {"type": "integer"}}},
            "Peer": {"type": "object", "required": ["node_id", "url"],
                     "properties": {"node_id": {"type": "string"}, "url": {"type": "string"},
                                    "state": {"type": "string"},
                                    "in_sync": {"type": "boolean"}}},
        },
    },
    "paths": {
        "/": {"get": {"summary": "The dashboard page (asks for a key, then keeps a session)",
                      "responses": {"200": {"description": "HTML", "content": {
                          "text/html": {"schema": {"type": "string"}}}}}}},
        "/dashboard.js": {"get": {"summary": "The dashboard's script", "responses": {
            "200": {"description": "JavaScript", "content": {
                "text/javascript": {"schema": {"type": "string"}}}}}}},
        "/dashboard.css": {"get": {"summary": "The dashboard's style sheet", "responses": {
            "200": {"description": "CSS", "content": {
                "text/css": {"schema": {"type": "string"}}}}}}},
        "/api/v1/session": {
            "post": {"summary": "Open a dashboard session with the key in X-API-Key: sets an "
                                "HttpOnly, SameSite=Strict cookie; answers the role and the "
                                "CSRF token to echo in X-CSRF-Token on changes",
                     "responses": {"201": _json(_OBJ, "session opened"), "401": _ERR,
                                   "403": _ERR}},
            "get": {"summary": "The caller's role (and, for a session, its CSRF token)",
                    "responses": {"200": _json(_OBJ)}},
            "delete": {"summary": "Close the dashboard session", "responses": {
                "200": _json(_OBJ)}}},
        "/viewer": {"get": {"summary": "Redirects to /viewer/", "responses": {
            "308": {"description": "to /viewer/"}}}},
        "/viewer/app-config.js": {"get": {
            "summary": "The web viewer's settings: its data source is this node's DICOMweb",
            "responses": {"200": {"description": "JavaScript", "content": {
                "text/javascript": {"schema": {"type": "string"}}}}}}},
        "/viewer/{path}": {"get": {
            "summary": "The web viewer (OHIF, installed by `syncnode viewer install`): its "
                       "files are open; its pages redirect to the dashboard's sign-in "
                       "without a session, as the data they load needs one",
            "parameters": [{"name": "path", "in": "path", "required": True,
                            "schema": {"type": "string"}}],
            "responses": {"200": {"description": "a file of the viewer", "content": {
                "text/html": {"schema": {"type": "string"}}}},
                "303": {"description": "no session: to the dashboard's sign-in"},
                "404": {"description": "no such file, or the viewer is not installed"}}}},
        "/healthz": {"get": {"summary": "Liveness", "responses": {"200": _json(_OBJ)}}},
        "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": {
            "description": "text exposition format",
            "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
        "/api/v1/": {"get": {"summary": "Index: every route of this API with its summary "
                                       "and the role it needs",
                             "responses": {"200": _json(_OBJ)}}},
        "/api/v1": {"get": {"summary": "The same index", "responses": {"200": _json(_OBJ)}}},
        "/api/v1/openapi.json": {"get": {"summary": "This document",
                                         "responses": {"200": _json(_OBJ)}}},
        "/api/v1/status": {"get": {"summary": "Counts, Merkle root, peers",
                                   "responses": {"200": _json(_OBJ)}}},
        "/api/v1/nodes": {
            "get": {"summary": "Trusted peers with their state", "responses": {
                "200": _json({"type": "array", "items": {"$ref": "#/components/schemas/Peer"}})}},
            "post": {"summary": "Trust a peer", "security": _KEY,
                     "requestBody": {"required": True, "content": {"application/json": {
                         "schema": {"type": "object", "required": ["node_id", "url"],
                                    "properties": {"node_id": {"type": "string"},
                                                   "url": {"type": "string"},
                                                   "push": {"type": "string",
                                                            "enum": list(PUSH_MODES)}}}}}},
                     "responses": {"201": _json(_OBJ, "trusted"), "400": _ERR, "401": _ERR,
                                   "403": _ERR, "409": _ERR}},
        },
        "/api/v1/nodes/{node_id}": {"delete": {
            "summary": "Stop trusting a peer", "security": _KEY, "parameters": [_NODE_ID],
            "responses": {"200": _json(_OBJ), "400": _ERR, "401": _ERR, "403": _ERR,
                          "404": _ERR}}},
        "/api/v1/discovered": {"get": {"summary": "Nodes seen on the LAN, not yet trusted",
                                       "responses": {"200": _json({"type": "array",
                                                                   "items": _OBJ})}}},
        "/api/v1/discovered/{node_id}/accept": {"post": {
            "summary": "Trust a node seen on the LAN", "security": _KEY,
            "parameters": [_NODE_ID],
            "responses": {"201": _json(_OBJ), "400": _ERR, "401": _ERR, "403": _ERR,
                          "404": _ERR, "409": _ERR}}},
        "/api/v1/instances": {"get": {
            "summary": "Live instances, filtered and paged",
            "parameters": [
                {"name": n, "in": "query", "required": False, "schema": s} for n, s in (
                    ("study", {"type": "string"}), ("series", {"type": "string"}),
                    ("patient_id", {"type": "string"}), ("modality", {"type": "string"}),
                    ("date_from", {"type": "string", "pattern": "^[0-9]{8}$"}),
                    ("date_to", {"type": "string", "pattern": "^[0-9]{8}$"}),
                    ("limit", {"type": "integer", "minimum": 1, "maximum": 1000}),
                    ("offset", {"type": "integer", "minimum": 0, "maximum": 10**12}))],
            "responses": {"200": _json({"type": "object", "required": ["instances"],
                                        "properties": {"instances": {
                                            "type": "array",
                                            "items": {"$ref": "#/components/schemas/Instance"}},
                                            "more": {"type": "boolean"}}}),
                          "400": _ERR}}},
        "/api/v1/instances/{sop_uid}": {"delete": {
            "summary": "Delete (a tombstone that syncs; the export PACS that received it "
                       "are sent a rejection note)", "security": _KEY,
            "parameters": [_SOP, {"name": "reason", "in": "query", "required": False,
                                  "description": "what the rejection note says (default: "
                                                 "the destination's export_reject_reason)",
                                  "schema": {"type": "string", "enum": [
                                      "quality", "safety", "worklist", "retention",
                                      "113001", "113037", "113038", "113039"]}}],
            "responses": {"200": _json(_OBJ), "400": _ERR, "401": _ERR, "403": _ERR,
                          "404": _ERR}}},
        "/api/v1/instances/{sop_uid}/file": {"get": {
            "summary": "The instance's exact bytes", "parameters": [_SOP],
            "responses": {"200": {"description": "DICOM Part-10 file", "content": {
                "application/dicom": {"schema": {"type": "string", "format": "binary"}}}},
                "400": _ERR, "404": _ERR}}},
        "/api/v1/studies": {"get": {"summary": "Live studies with counts",
                                    "responses": {"200": _json({"type": "array",
                                                                "items": _OBJ})}}},
        "/api/v1/config": {
            "get": {"summary": "Effective settings", "responses": {"200": _json(_OBJ)}},
            "patch": {"summary": "Change settings (persisted; some need a restart)",
                      "security": _KEY,
                      "requestBody": {"required": True, "content": {"application/json": {
                          "schema": _OBJ}}},
                      "responses": {"200": _json(_OBJ), "400": _ERR, "401": _ERR,
                                    "403": _ERR}}},
        "/api/v1/limits": {"get": {
            "summary": "Bandwidth caps: scope -> schedule as configured, and the rate in "
                       "force now per scope (in, out, NODEID:in, NODEID:out)",
            "responses": {"200": _json({"type": "object", "required": ["caps", "in_force"],
                                        "properties": {"caps": _OBJ, "in_force": _OBJ}})}}},
        "/api/v1/limits/{scope}": {
            "put": {"summary": "Set the cap of a scope (in, out, NODEID:in, NODEID:out) to a "
                               "schedule, e.g. '2MB/s 07:00-19:00 Mon-Fri, unlimited "
                               "otherwise'; persisted, in force at once",
                    "parameters": [_SCOPE],
                    "requestBody": {"required": True, "content": {"application/json": {
                        "schema": {"type": "object", "required": ["schedule"],
                                   "properties": {"schedule": {"type": "string"}}}}}},
                    "responses": {"200": _json(_OBJ), "400": _ERR}},
            "delete": {"summary": "Remove the cap of a scope (unlimited)",
                       "parameters": [_SCOPE],
                       "responses": {"200": _json(_OBJ), "400": _ERR, "404": _ERR}}},
        "/api/v1/events": {"get": {
            "summary": "Long-poll feed of changes; ids only grow",
            "parameters": [
                {"name": "since", "in": "query", "schema": {"type": "integer", "minimum": 0}},
                {"name": "timeout", "in": "query",
                 "schema": {"type": "number", "minimum": 0, "maximum": 60}}],
            "responses": {"200": _json(_OBJ), "400": _ERR}}},
    },
}


OPENAPI["paths"].update(OPENAPI_PATHS)  # DICOMweb: QIDO-RS, WADO-RS (read), STOW-RS (admin)

# The least role of every operation: read by the API's guard (syncnode.admin.auth).
_ROLES = {
    ("/", "get"): "public", ("/dashboard.js", "get"): "public",
    ("/dashboard.css", "get"): "public", ("/healthz", "get"): "public",
    ("/metrics", "get"): "public", ("/api/v1/openapi.json", "get"): "public",
    ("/viewer", "get"): "public", ("/viewer/app-config.js", "get"): "public",
    ("/viewer/{path}", "get"): "public",
    ("/api/v1/", "get"): "public", ("/api/v1", "get"): "public",  # routes, no data
    ("/api/v1/session", "post"): "public",  # checks the key it is given itself
    ("/api/v1/nodes", "post"): "admin", ("/api/v1/nodes/{node_id}", "delete"): "admin",
    ("/api/v1/discovered/{node_id}/accept", "post"): "admin",
    ("/api/v1/instances/{sop_uid}", "delete"): "admin", ("/api/v1/config", "patch"): "admin",
    **{(path, "post"): "admin" for path in STOW_PATHS},
    ("/api/v1/limits/{scope}", "put"): "admin", ("/api/v1/limits/{scope}", "delete"): "admin",
}
for _path, _ops in OPENAPI["paths"].items():
    for _method, _op in _ops.items():
        _role = _ROLES.get((_path, _method), "read")
        _op.update({"public": _PUBLIC, "read": _READ, "admin": _ADMIN}[_role])
        if _role != "public":
            _op["responses"] = {**_DENIED, **_op["responses"]}
        _op["responses"].setdefault(
            "421", {"description": "Host is not a name this node serves"})
