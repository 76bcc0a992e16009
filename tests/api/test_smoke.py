def test_center_admin_lists_every_tenant(clients):
    resp = clients["admin"].get("/api/v1/tenants")
    assert resp.status_code == 200
    codes = [t["code"] for t in resp.json()["data"]]
    assert codes == ["a", "a1", "a2", "b", "b1", "center"]


def test_agency_admin_sees_only_own_agency(clients):
    resp = clients["a-admin"].get("/api/v1/tenants")
    assert [t["code"] for t in resp.json()["data"]] == ["a", "a1", "a2"]
