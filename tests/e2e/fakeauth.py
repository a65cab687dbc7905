"""A paste filter that stands in for keystonemiddleware's auth_token in the end-to-end suite.

glance runs DevStack's keystone pipeline with `authtoken` replaced by this filter:

    cors http_proxy_to_wsgi versionnegotiation osprofiler fakeauth context rootapp

Every request is marked as authenticated (X-Identity-Status: Confirmed, a fixed user, project and
roles), so glance's real keystone ContextMiddleware runs. That middleware adopts an incoming
X-OpenStack-Request-ID as its request id, which is what the suite checks, and no Keystone is needed.
The client's X-Auth-Token is never looked at.
"""


def filter_factory(global_conf, **local_conf):
    identity = {
        "HTTP_X_IDENTITY_STATUS": "Confirmed",
        "HTTP_X_USER_ID": local_conf.get("user_id", "e2e-user"),
        "HTTP_X_PROJECT_ID": local_conf.get("project_id", "e2e-project"),
        "HTTP_X_ROLES": local_conf.get("roles", "admin,member,reader"),
    }

    def wrap(app):
        def middleware(environ, start_response):
            environ.update(identity)
            return app(environ, start_response)
        return middleware
    return wrap
