package ferry

import scala.jdk.CollectionConverters._

import org.scalatest.funsuite.AnyFunSuite

/** Runs the Java callers in scala/src/test/java (compiled by the same build). */
class JavaApiSuite extends AnyFunSuite with SparkSuite {

  test("a Java caller runs Convolve") {
    val n = 50
    val rows = JavaConvolveExample.convolve(spark, n).asScala
    val re = Array.tabulate(n)(_.toDouble)
    val im = Array.tabulate(n)(_ * 0.5)
    val (er, ei) = ConvolveSuite.reference(re, im, Array(1.0, 2.0, 1.0), Array(0.0, 0.0, 1.0), "full")
    assert(rows.length == n + 2)
    rows.zipWithIndex.foreach { case (r, o) =>
      assert(r.getLong(0) == o)
      assert(math.abs(r.getDouble(1) - er(o)) < 1e-9 && math.abs(r.getDouble(2) - ei(o)) < 1e-9)
    }
  }

  test("a Java caller runs a PythonStage with a java.util.Map of params") {
    val ys = JavaConvolveExample.scale(spark, 1.5).asScala.map(_.getDouble(0))
    assert(ys == Seq(0.0, 1.5, 3.0, 4.5, 6.0))
  }

  test("a Java caller encodes with a LopqModel file") {
    val model = new java.io.File(sys.env.getOrElse("FERRY_SHARED_DATA", s"${TestSpark.repo}/../shared/data"),
      "lopq/random_test_model.lopq").getAbsolutePath
    val rnd = new scala.util.Random(7)
    val vectors = Seq.fill(12)(Array.fill(8)(rnd.nextGaussian()))
    val rows = JavaConvolveExample.lopqCodes(spark, model, vectors.asJava).asScala
    val schema = org.apache.spark.sql.types.StructType.fromDDL("id bigint, vector array<double>")
    val expected = LopqModel.fromFile(model).transform(spark.createDataFrame(
      vectors.zipWithIndex.map { case (v, i) => org.apache.spark.sql.Row(i.toLong, v.toSeq) }.asJava, schema))
      .orderBy("id").collect().toSeq
    assert(rows.length == 12 && rows.map(_.getSeq[Int](2)) == expected.map(_.getSeq[Int](2)))
    assert(rows.map(_.getSeq[Int](1)) == expected.map(_.getSeq[Int](1)))
  }
}
