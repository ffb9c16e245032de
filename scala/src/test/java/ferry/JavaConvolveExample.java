package ferry;

import java.util.ArrayList;
import java.util.HashMap;
import java.util.List;
import java.util.Map;

import org.apache.spark.sql.Dataset;
import org.apache.spark.sql.Row;
import org.apache.spark.sql.RowFactory;
import org.apache.spark.sql.SparkSession;
import org.apache.spark.sql.types.DataTypes;
import org.apache.spark.sql.types.StructType;

/** What a Java caller writes: proves the Scala API compiles and runs from Java. */
public final class JavaConvolveExample {

  private JavaConvolveExample() {}

  /** Convolves x[i] = i + 0.5i with the kernel (1, 2, 1+1i) in mode "full"; rows sorted by id. */
  public static List<Row> convolve(SparkSession spark, int n) {
    List<Row> rows = new ArrayList<>();
    for (long i = 0; i < n; i++) {
      rows.add(RowFactory.create(i, (double) i, 0.5 * i));
    }
    StructType schema = new StructType()
        .add("id", DataTypes.LongType, false)
        .add("real", DataTypes.DoubleType)
        .add("imag", DataTypes.DoubleType);
    Dataset<Row> df = spark.createDataFrame(rows, schema).repartition(3);
    Dataset<Row> out = new Convolve()
        .setKernelReal(new double[] {1.0, 2.0, 1.0})
        .setKernelImag(new double[] {0.0, 0.0, 1.0})
        .setMode("full")
        .transform(df);
    return out.orderBy("id").collectAsList();
  }

  /** Runs the test stage `scale` with params given as a Java map. */
  public static List<Row> scale(SparkSession spark, double factor) {
    Map<String, Object> params = new HashMap<>();
    params.put("factor", factor);
    Dataset<Row> df = spark.range(5).selectExpr("CAST(id AS DOUBLE) AS x");
    return new PythonStage().setStageName("scale").setParams(params).transform(df).orderBy("y").collectAsList();
  }

  /** Encodes vectors (ids 0..n-1) with an LOPQ model file; rows (id, coarse, fine) sorted by id. */
  public static List<Row> lopqCodes(SparkSession spark, String modelPath, List<double[]> vectors) {
    List<Row> rows = new ArrayList<>();
    for (int i = 0; i < vectors.size(); i++) {
      List<Double> v = new ArrayList<>();
      for (double x : vectors.get(i)) {
        v.add(x);
      }
      rows.add(RowFactory.create((long) i, v));
    }
    StructType schema = new StructType()
        .add("id", DataTypes.LongType)
        .add("features", DataTypes.createArrayType(DataTypes.DoubleType));
    LopqModel model = LopqModel.fromFile(modelPath).setVectorCol("features");
    return model.transform(spark.createDataFrame(rows, schema)).orderBy("id").collectAsList();
  }
}
